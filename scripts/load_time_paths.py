"""What serving stacks do to MiniMax-M3's MXFP8 experts at every load on MI300X, in plain torch, for the
benchmarks to set beside ours (the peers' math from its description, no copied code):

- BF16 emulation (vLLM 0.33 on gfx942): each weight dequantized to BF16, E4M3FN value x 2**(byte - 127).
- block-FP8 (SGLang on gfx942, vLLM pull request 45726): dequantized, then requantized to E4M3FN with one
  FP32 scale per 128x128 block (scale = block amax / 448), then FN -> FNUZ (-0 -> 0, scale x 2).

Both run in their fastest reasonable form: a chunk of experts at a time on the GPU (bounded temporaries),
the next chunk read from disk on threads into pinned memory while the GPU converts this one.
Shape legend: E experts, c experts in a chunk, I intermediate, H hidden, G = K / 32.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mxconvert.checkpoint import SourceCheckpoint
from mxconvert.layout import BLOCK, FN_NEG_ZERO, dequantize
from mxconvert.runtime.loader import _pread

FP8_BLOCK = 128  # the block-FP8 path's scale block, both axes
FN_MAX = 448.0
CHUNK_EXPERTS = 8
READERS = 8


def block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [c, N, K] -> (FNUZ bytes [c, N, K], FP32 scales [c, N/128, K/128]) as the block-FP8 path
    requantizes: E4M3FN with scale = block amax / 448, then -0 -> 0 and the scale doubled for FNUZ."""
    c, n, k = w.shape
    blocks = w.view(c, n // FP8_BLOCK, FP8_BLOCK, k // FP8_BLOCK, FP8_BLOCK)
    scale = (blocks.abs().amax(dim=(2, 4)) / FN_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (blocks / scale[:, :, None, :, None]).to(torch.float8_e4m3fn).view(torch.uint8).view(c, n, k)
    return q.masked_fill_(q == FN_NEG_ZERO, 0), scale * 2


def block_fp8_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FNUZ bytes [c, N, K] and block scales [c, N/128, K/128] -> float32 values."""
    c, n, k = q.shape
    v = q.view(torch.float8_e4m3fnuz).float().view(c, n // FP8_BLOCK, FP8_BLOCK, k // FP8_BLOCK, FP8_BLOCK)
    return (v * scale[:, :, None, :, None]).view(c, n, k)


class SourceExperts:
    """One MoE layer's routed experts of an MXFP8 source, read a chunk of experts at a time onto a device as
    raw bytes stacked the way the serving stacks stack them: w13 [c, 2I, H] (gate rows, then up), w2 [c, H, I],
    scales [c, N, G]."""

    def __init__(self, model_dir: str | Path, prefix: str | None = None):
        self.src = SourceCheckpoint(Path(model_dir))
        self.prefix = prefix or next(iter(self.src.groups))
        self.experts = self.src.groups[self.prefix].experts
        self.num_experts = len(self.experts)
        self.intermediate, self.hidden = self.experts[0]["gate"][0].shape

    def shapes(self, c: int) -> dict[str, tuple[int, ...]]:
        i, h = self.intermediate, self.hidden
        return dict(w13=(c, 2 * i, h), s13=(c, 2 * i, h // BLOCK), w2=(c, h, i), s2=(c, h, i // BLOCK))

    def _runs(self, first: int, c: int):
        """(file, offset, bytes, offset in the chunk buffer) of each source tensor of experts [first, first + c)."""
        runs, at = [], 0
        for projs, kind in ((("gate", "up"), 0), (("gate", "up"), 1), (("down",), 0), (("down",), 1)):
            for x in range(first, first + c):
                for p in projs:
                    info = self.experts[x][p][kind]
                    runs.append((info.file, info.offset, info.nbytes, at))
                    at += info.nbytes
        return runs, at

    def chunks(self, device, *, step: int = CHUNK_EXPERTS):
        """Yield (first expert, {w13, s13, w2, s2} uint8 on device) for each chunk; the next chunk is read
        while the caller works on this one."""
        shapes = self.shapes(step)
        size = sum(torch.Size(s).numel() for s in shapes.values())
        pin = torch.device(device).type == "cuda"
        host = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        fds = {}
        for info in (t for e in self.experts.values() for pair in e.values() for t in pair):
            fds.setdefault(info.file, self.src.files.open(info.file.name))

        def fill(buf: torch.Tensor, first: int, c: int) -> int:
            runs, used = self._runs(first, c)
            view = memoryview(buf.numpy()).cast("B")
            pieces = [(f, off + j, min(1 << 22, n - j), at + j) for f, off, n, at in runs for j in range(0, n, 1 << 22)]
            list(pool.map(lambda p: _pread(fds[p[0]], view[p[3] : p[3] + p[2]], p[1], p[0]), pieces))
            return used

        try:
            with ThreadPoolExecutor(READERS) as pool, ThreadPoolExecutor(1) as ahead:
                starts = list(range(0, self.num_experts, step))
                pending = ahead.submit(fill, host[0], 0, min(step, self.num_experts))
                for j, first in enumerate(starts):
                    c = min(step, self.num_experts - first)
                    used = pending.result()
                    dev = host[j % 2][:used].to(device, non_blocking=pin)
                    if pin:
                        done = torch.cuda.Event()
                        done.record()
                    if j + 1 < len(starts):  # the other buffer's copy finished before its chunk was handed out
                        nxt = starts[j + 1]
                        pending = ahead.submit(fill, host[(j + 1) % 2], nxt, min(step, self.num_experts - nxt))
                    out, at = {}, 0
                    for name, shape in self.shapes(c).items():
                        n = torch.Size(shape).numel()
                        out[name] = dev[at : at + n].view(shape)
                        at += n
                    yield first, out
                    if pin:
                        done.synchronize()  # host[j % 2] is free for chunk j + 2
        finally:
            for fd in fds.values():
                os.close(fd)


def bf16_at_load(src: SourceExperts, device) -> dict[str, torch.Tensor]:
    """BF16 emulation: w13_bf16 [E, 2I, H], w2_bf16 [E, H, I], dequantized from the source on device."""
    shapes = src.shapes(src.num_experts)
    out = {k: torch.empty(shapes[k], dtype=torch.bfloat16, device=device) for k in ("w13", "w2")}
    for first, raw in src.chunks(device):
        c = raw["w13"].shape[0]
        for k in ("w13", "w2"):
            out[k][first : first + c] = dequantize(raw[k], raw["s" + k[1:]], fnuz=False, dtype=torch.bfloat16)
    return dict(w13_bf16=out["w13"], w2_bf16=out["w2"])


def block_fp8_at_load(src: SourceExperts, device) -> dict[str, torch.Tensor]:
    """Block-FP8: w13 [E, 2I, H] / w2 [E, H, I] FNUZ bytes with FP32 scales [E, N/128, K/128]."""
    shapes = src.shapes(src.num_experts)
    out = {}
    for k in ("w13", "w2"):
        e, n, kk = shapes[k]
        out[k] = torch.empty(shapes[k], dtype=torch.uint8, device=device)
        out[k + "_scale"] = torch.empty(e, n // FP8_BLOCK, kk // FP8_BLOCK, dtype=torch.float32, device=device)
    for first, raw in src.chunks(device):
        c = raw["w13"].shape[0]
        for k in ("w13", "w2"):
            q, s = block_fp8(dequantize(raw[k], raw["s" + k[1:]], fnuz=False, dtype=torch.float32))
            out[k][first : first + c], out[k + "_scale"][first : first + c] = q, s
    return out
