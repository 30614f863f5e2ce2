"""Opening a converted OUT_DIR and loading expert groups (whole, or one TP/EP rank's slice) onto a device.

Only the rank's bytes are read, with pread straight from the shards: contiguous runs (whole tensors,
expert ranges, w13's gate and up rows) in chunks on a few threads, staged through two pinned buffers
on their way to a GPU; strided slices (w2's K columns, packed scale columns) through a read-only mmap.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mxconvert import format as fmt
from mxconvert.errors import MxconvertError, plain_name, read_json
from mxconvert.headers import DTYPE_BYTES, TensorInfo, read_header
from mxconvert.kernels.quant import SwigluOAI
from mxconvert.manifest import load_manifest
from mxconvert.runtime.bands import bands_for
from mxconvert.runtime.moe import ExpertWeights, MoELayer, bf16_copies, needs_bf16, runs_native
from mxconvert.runtime.sharding import ONE_RANK, ExpertSlice, Ranks, expert_slices

TORCH_DTYPE = {"F8_E4M3FNUZ": torch.uint8, "U8": torch.uint8, "BF16": torch.bfloat16, "F32": torch.float32}
CHUNK = 64 * 2**20  # bytes per staged read
READERS = 4  # threads per chunk


class ConvertedCheckpoint:
    """A finished conversion (manifest present, format v1): its expert groups, dispatch and activation."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        if not self.dir.is_dir():
            raise MxconvertError(self.dir, "is not a directory", "Pass the OUT_DIR of an mxconvert conversion")
        self.manifest = load_manifest(self.dir)  # refuses a missing manifest or an unknown format_version
        self.config = self._json("config.json")
        self.text_config = self.config.get("text_config", self.config)
        quant = fmt.read_converted(self.config, self.dir / "config.json")
        self.layers: dict[str, str] = quant.layers  # expert group prefix -> storage
        self.dispatch = quant.dispatch
        self.activation = SwigluOAI(**quant.activation)
        weight_map = self._json(fmt.INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MxconvertError(self.dir / fmt.INDEX_NAME, "weight_map is not a map", "Convert again")
        for shard in set(weight_map.values()):  # names from JSON stay inside OUT_DIR
            plain_name(shard, self.dir / fmt.INDEX_NAME, fix="Convert again", what="shard")
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, tuple[dict, int]] = {}

    def _json(self, name: str) -> dict:
        return read_json(self.dir / name, fix="Convert again", missing_fix="Convert again into this directory")

    @property
    def top_k(self) -> int:
        return self.text_config["num_experts_per_tok"]

    @property
    def routed_scaling_factor(self) -> float:
        return self.text_config.get("routed_scaling_factor", 1.0)

    def tensor(self, name: str) -> TensorInfo:
        shard = self.weight_map.get(name)
        if shard is None:
            raise MxconvertError(name, f"is not in {fmt.INDEX_NAME}", "Check the name, or convert again")
        if shard not in self._headers:
            header, start, _ = read_header(self.dir / shard)
            self._headers[shard] = (header, start)
        header, start = self._headers[shard]
        entry = header[name]
        begin, end = entry["data_offsets"]
        return TensorInfo(name, self.dir / shard, entry["dtype"], tuple(entry["shape"]), start + begin, end - begin)

    def read(self, name: str, sl: ExpertSlice | None = None, *, device="cpu") -> torch.Tensor:
        """Tensor `name` (or an expert slice of it) on `device`: FP8 and scales as uint8 bytes."""
        info = self.tensor(name)
        if info.dtype not in TORCH_DTYPE:
            raise MxconvertError(name, f"is {info.dtype}", f"the runtime reads {sorted(TORCH_DTYPE)}")
        out = torch.empty(sl.shape if sl else info.shape, dtype=TORCH_DTYPE[info.dtype], device=device)
        if out.numel() == 0:
            return out
        runs = _runs(info, sl) if sl else [(info.offset, info.nbytes)]
        if runs is None:  # strided: through an mmap, then one copy
            out.copy_(torch.from_numpy(_mmap_slice(info, sl)).view(out.dtype))
        else:
            _read_runs(info.file, runs, out)
        return out

    def load_experts(
        self,
        prefix: str,
        *,
        device="cpu",
        ranks: Ranks = ONE_RANK,
        native: bool | None = None,
        bf16: bool = True,
    ) -> ExpertWeights:
        """One expert group's tensors for this rank. native: load the FP8 copies (default: not under
        expert parallelism, which runs BF16 only); bf16: load (or, for native_only groups, dequantize
        here on `device`) the BF16 copies: a layer whose BF16 band is empty needs none."""
        storage = self.layers.get(prefix)
        if storage is None:
            raise MxconvertError(prefix, "is not an expert group of this checkpoint", f"use one of {list(self.layers)}")
        native = not ranks.expert_parallel if native is None else native
        bf16 = bf16 or storage == fmt.BF16_ONLY or not native  # a layer runs something
        stored = fmt.STORED[storage]
        want = [s for s in stored if (bf16 if s in fmt.BF16_TENSORS else native or storage == fmt.NATIVE_ONLY)]
        got, first, e = {}, 0, None
        for suffix in want:
            info = self.tensor(f"{prefix}.{suffix}")
            sl = expert_slices(suffix, info.shape, ranks)
            got[suffix] = self.read(info.name, sl, device=device)
            first, e = sl.experts.start, info.shape[0]
        if storage == fmt.NATIVE_ONLY and bf16:
            got["w13_weight_bf16"], got["w2_weight_bf16"] = bf16_copies(
                got["w13_weight"], got["w13_weight_scale"], got["w2_weight"], got["w2_weight_scale"]
            )
            if not native:
                for suffix in fmt.NATIVE_TENSORS:
                    del got[suffix]
        return ExpertWeights(
            w13=got.get("w13_weight"),
            w13_scale=got.get("w13_weight_scale"),
            w2=got.get("w2_weight"),
            w2_scale=got.get("w2_weight_scale"),
            w13_bf16=got.get("w13_weight_bf16"),
            w2_bf16=got.get("w2_weight_bf16"),
            storage=storage,
            first_expert=first,
            num_experts=e,
        )


def _runs(info: TensorInfo, sl: ExpertSlice) -> list[tuple[int, int]] | None:
    """(file offset, bytes) runs whose concatenation is the slice, merged; None if it is strided."""
    shape, item = info.shape, DTYPE_BYTES[info.dtype]
    expert = int(np.prod(shape[1:])) * item
    if tuple(sl.shape[1:]) == tuple(shape[1:]):  # whole experts: one run
        return [(info.offset + sl.experts.start * expert, (sl.experts.stop - sl.experts.start) * expert)]
    if sl.axis != 1:
        return None
    inner = int(np.prod(shape[2:])) * item  # bytes of one row on axis 1
    runs: list[tuple[int, int]] = []
    for e in range(sl.experts.start, sl.experts.stop):
        for p in sl.parts:
            begin, size = info.offset + e * expert + p.start * inner, (p.stop - p.start) * inner
            if runs and runs[-1][0] + runs[-1][1] == begin:
                runs[-1] = (runs[-1][0], runs[-1][1] + size)
            else:
                runs.append((begin, size))
    return runs


def _mmap_slice(info: TensorInfo, sl: ExpertSlice) -> np.ndarray:
    item = DTYPE_BYTES[info.dtype]
    shape = (*info.shape[:-1], info.shape[-1] * item)  # bytes on the last axis
    m = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=shape)[sl.experts]
    k = item if sl.axis == len(shape) - 1 else 1
    parts = [m[(slice(None),) * sl.axis + (slice(p.start * k, p.stop * k),)] for p in sl.parts]
    return np.concatenate(parts, axis=sl.axis)  # a copy: touches only the pages that hold the slice


def _pread(fd: int, view: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise MxconvertError(
                file, "ends inside a tensor (truncated)", "Run mxconvert verify on it, and convert again"
            )
        done += n


def _chunks(runs: list[tuple[int, int]], size: int):
    """Split runs into chunks of at most `size` bytes: [(file offset, bytes, offset in the chunk), ...]."""
    chunk, used = [], 0
    for begin, length in runs:
        while length:
            n = min(length, size - used)
            chunk.append((begin, n, used))
            begin, length, used = begin + n, length - n, used + n
            if used == size:
                yield chunk, used
                chunk, used = [], 0
    if chunk:
        yield chunk, used


def _read_runs(file: Path, runs: list[tuple[int, int]], out: torch.Tensor) -> None:
    """pread the runs, in order, into out's bytes: directly on the CPU, via two pinned buffers to a GPU."""
    flat = out.view(-1).view(torch.uint8)
    fd = os.open(file, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(READERS) as pool:

            def fill(dst: torch.Tensor, chunk):
                view = memoryview(dst.numpy()).cast("B")
                pieces = []
                for begin, n, at in chunk:  # split big runs so every thread gets a share
                    step = max(1 << 20, -(-n // READERS))
                    pieces += [(begin + j, min(step, n - j), at + j) for j in range(0, n, step)]
                list(pool.map(lambda p: _pread(fd, view[p[2] : p[2] + p[1]], p[0], file), pieces))

            if out.device.type == "cpu":
                done = 0
                for chunk, used in _chunks(runs, CHUNK):
                    fill(flat[done : done + used], chunk)
                    done += used
                return
            staging = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            events = [None, None]
            done = 0
            for j, (chunk, used) in enumerate(_chunks(runs, CHUNK)):
                buf = staging[j % 2]
                if events[j % 2] is not None:
                    events[j % 2].synchronize()  # that buffer's last copy has left
                fill(buf, chunk)
                flat[done : done + used].copy_(buf[:used], non_blocking=True)
                events[j % 2] = torch.cuda.Event()
                events[j % 2].record()
                done += used
            torch.cuda.current_stream().synchronize()
    finally:
        os.close(fd)


def load_moe_layer(
    ckpt: ConvertedCheckpoint,
    prefix: str,
    *,
    device="cpu",
    ranks: Ranks = ONE_RANK,
    bands: tuple[int, int] | None = None,
    native_mode: str | None = None,
) -> MoELayer:
    """A ready MoELayer: the rank's weights (only those its bands use), the device's tuned bands (else
    the config's), the activation."""
    lo, hi = bands or bands_for(device, default=ckpt.dispatch)
    storage = ckpt.layers.get(prefix, fmt.DUAL)
    weights = ckpt.load_experts(
        prefix, device=device, ranks=ranks,
        native=runs_native(lo, hi, storage=storage, expert_parallel=ranks.expert_parallel),
        bf16=needs_bf16(lo, hi, storage=storage, expert_parallel=ranks.expert_parallel),
    )  # fmt: skip
    return MoELayer(
        weights, bf16_max_tokens=lo, bf16_min_tokens=hi, activation=ckpt.activation, native_mode=native_mode
    )


def load_moe_layers(ckpt: ConvertedCheckpoint, *, device="cpu", progress: bool = True, **kwargs) -> dict[str, MoELayer]:
    """Every expert group of the checkpoint as a ready MoELayer (load_moe_layer's keywords), by prefix."""
    return {
        prefix: load_moe_layer(ckpt, prefix, device=device, **kwargs)
        for prefix in tqdm(ckpt.layers, desc="loading MoE layers", unit="layer", disable=not progress)
    }
