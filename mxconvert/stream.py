"""Streaming each output tensor's bytes from the source: pass-through chunks, and experts one at a time.

Each source byte is read once: a group's scales first (1/32 of its bytes, kept), then per stack (w13,
then w2) each expert's values, which yield its slice of the FNUZ and BF16 tensors before the next is
read. Experts run on a small thread pool (torch, numpy and pread/pwrite release the GIL), a bounded number
in flight, so memory stays at a few experts' worth whatever the model's size.
Shape legend: N out, K in, G = K // 32; w13 is [2I, H] per expert, w2 [H, I].
"""

import ctypes
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from functools import partial

import torch
from tqdm.auto import tqdm

from . import format as fmt
from . import layout
from .checkpoint import SourceCheckpoint
from .errors import MxconvertError
from .headers import TensorInfo
from .plan import COPY_CHUNK, PROJECTIONS, Plan, PlannedGroup, Shard
from .writer import ShardSet, ShardWriter

STACKS = fmt.STACKS
BF16_ROWS = 256  # rows per BF16 conversion step: keeps the temporaries in cache
WORKERS = max(1, min(4, os.cpu_count() or 1))  # expert threads
_scratch = threading.local()


def _buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer reused across experts: fresh 100 MB allocations cost more in page faults
    than the conversion itself."""
    numel = 1
    for d in shape:
        numel *= d
    buf = getattr(_scratch, role, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, role, buf)
    return buf[:numel].view(shape)


def copy_tensor(source: SourceCheckpoint, info: TensorInfo, sink: ShardSet) -> None:
    """A passed-through tensor, byte for byte, in chunks of COPY_CHUNK."""
    for start in range(0, info.nbytes, COPY_CHUNK):
        sink.write(info.name, start, source.read(info, start, min(COPY_CHUNK, info.nbytes - start)))


def _read_checked(source: SourceCheckpoint, infos: list[TensorInfo], *, scale: bool, out: torch.Tensor) -> torch.Tensor:
    """The tensors stacked along rows into `out`, refusing bytes FNUZ cannot represent."""
    row = 0
    for info in infos:
        part = source.read_tensor(info, out=out[row : row + info.shape[0]])
        bad = layout.first_bad_scale(part) if scale else layout.first_bad_value(part)
        if bad is not None:
            r, c = divmod(bad, part.shape[1])
            why = (
                f"scale byte {int(part[r, c])} at [{r}, {c}] has no E4M3FNUZ counterpart (max 253)"
                if scale
                else f"value byte 0x{int(part[r, c]):02X} at [{r}, {c}] is NaN in E4M3FN"
            )
            raise MxconvertError(info.name, why, "The source checkpoint is corrupt or not MXFP8; re-download it")
        row += info.shape[0]
    return out


def _write_bf16(values: torch.Tensor, scales: torch.Tensor, sink: ShardSet, name: str, offset: int, device: str):
    """Exact BF16 copies of [N, K] values, written at `offset`: on the CPU BF16_ROWS rows at a time
    (a few MB per worker, not a whole expert), on a GPU in one go."""
    if device != "cpu":
        sink.write(name, offset, layout.dequantize_bf16(values.to(device), scales.to(device)).cpu())
        return
    n, k = values.shape
    out = _buffer("bf16", (BF16_ROWS, k), torch.bfloat16)
    for r in range(0, n, BF16_ROWS):
        rows = min(BF16_ROWS, n - r)
        layout.dequantize_bf16(values[r : r + rows], scales[r : r + rows], out=out[:rows])
        sink.write(name, offset + r * k * 2, out[:rows])  # written (or compared) before the buffer is reused


def check_scales(source: SourceCheckpoint, groups: list[PlannedGroup], *, pool: Executor, on_bytes=None) -> None:
    """Every expert scale of these groups, checked before the first output byte: 1/32 of the expert bytes
    (the values are checked as they stream, each before any byte made from it is written)."""

    def check(group: PlannedGroup, e: int) -> None:
        for proj in PROJECTIONS:
            info = group.source.experts[e][proj][1]
            _read_checked(source, [info], scale=True, out=_buffer("scales", info.shape, torch.uint8))
            if on_bytes is not None:
                on_bytes(info.nbytes)

    _run_all(pool, [(check, g, e) for g in groups for e in range(g.num_experts)], in_flight=64)


def _run_all(pool: Executor, calls: list[tuple], *, in_flight: int, on_submit: list | None = None) -> None:
    """Each (fn, *args) on the pool, at most `in_flight` at a time; the first error stops the rest.
    on_submit[i]() runs as call i is queued (a read-ahead hint)."""
    pending = deque()
    try:
        for i, (fn, *args) in enumerate(calls):
            if len(pending) >= in_flight:
                pending.popleft().result()
            if on_submit is not None:
                on_submit[i]()
            pending.append(pool.submit(fn, *args))
        while pending:
            pending.popleft().result()
    except BaseException:
        for future in pending:
            future.cancel()
        wait(pending)  # nothing may still write once the caller aborts the shards
        raise


def read_scales(source: SourceCheckpoint, group: PlannedGroup, stacks=("w13", "w2")) -> dict[str, torch.Tensor]:
    """Every expert's FNUZ scales per stack, {"w13": [E, 2I, H/32], "w2": [E, H, I/32]}: 1/32 of the
    group's bytes, read (and checked) before any of its values."""
    scales = {}
    for stack, projs in STACKS:
        if stack not in stacks:
            continue
        first = [group.source.experts[0][p][1] for p in projs]
        out = torch.empty(group.num_experts, sum(i.shape[0] for i in first), first[0].shape[1], dtype=torch.uint8)
        for e in range(group.num_experts):
            _read_checked(source, [group.source.experts[e][p][1] for p in projs], scale=True, out=out[e])
        scales[stack] = layout.fn_to_fnuz_scales(out, inplace=True)
    return scales


def write_expert(
    source: SourceCheckpoint,
    group: PlannedGroup,
    e: int,
    stack: str,
    scales: torch.Tensor,
    sink: ShardSet,
    *,
    device: str,
    kinds: set[str] | None = None,
) -> None:
    """Expert e's slice of one stack (w13 or w2): FNUZ values and BF16 copies, as the storage says
    (or only those of `kinds`)."""
    stored, projs = kinds or set(fmt.STORED[group.storage]), dict(STACKS)[stack]
    infos = [group.source.experts[e][p][0] for p in projs]
    values = _buffer("values", (sum(i.shape[0] for i in infos), infos[0].shape[1]), torch.uint8)  # [N, K]
    layout.fn_to_fnuz_values(_read_checked(source, infos, scale=False, out=values), inplace=True)
    if f"{stack}_weight" in stored:
        sink.write(f"{group.prefix}.{stack}_weight", e * values.numel(), values)
    if f"{stack}_weight_bf16" in stored:
        _write_bf16(values, scales, sink, f"{group.prefix}.{stack}_weight_bf16", e * values.numel() * 2, device)


def _prefetch(source: SourceCheckpoint, group: PlannedGroup, e: int, stack: str, sink: ShardSet, kinds: set[str]):
    """Ask the disk for expert e's source values (and, when verifying, its output bytes) while earlier
    experts compute: a queued expert's reads then overlap the work in flight."""
    infos = [group.source.experts[e][p][0] for p in dict(STACKS)[stack]]
    for info in infos:
        source.prefetch(info)
    numel = sum(i.nbytes for i in infos)
    for kind, size in ((f"{stack}_weight", 1), (f"{stack}_weight_bf16", 2)):
        if kind in kinds:
            sink.prefetch(f"{group.prefix}.{kind}", e * numel * size, numel * size)


def write_group(
    source: SourceCheckpoint,
    group: PlannedGroup,
    sink: ShardSet,
    *,
    device: str,
    pool: Executor,
    in_flight: int,
    kinds: set[str] | None = None,
) -> None:
    """A group's packed scales, then each stack's experts on the pool, at most `in_flight` at a time.

    Stack by stack, so that at any time few tensors fill at once, each in order: the shard hash then
    takes the bytes from memory (ShardWriter). kinds: only these of the group's tensors (a --resume
    skips those in shards already finished); a stack with none of them is not even read.
    """
    kinds = set(fmt.STORED[group.storage]) if kinds is None else set(kinds)
    stacks = [stack for stack, _ in STACKS if any(k.startswith(stack + "_") for k in kinds)]
    scales = read_scales(source, group, stacks)
    for stack in stacks:
        if f"{stack}_weight_scale" in kinds:
            sink.write(f"{group.prefix}.{stack}_weight_scale", 0, layout.pack_scales(scales[stack]))  # [E, G, N]
    todo = [(e, stack) for stack in stacks if {f"{stack}_weight", f"{stack}_weight_bf16"} & kinds
            for e in range(group.num_experts)]  # fmt: skip
    calls = [
        (partial(write_expert, device=device, kinds=kinds), source, group, e, stack, scales[stack][e], sink)
        for e, stack in todo
    ]
    prefetch = [partial(_prefetch, source, group, e, stack, sink, kinds) for e, stack in todo]
    _run_all(pool, calls, in_flight=in_flight, on_submit=prefetch)


def stream_shards(
    source: SourceCheckpoint,
    plan: Plan,
    out: "os.PathLike",
    todo: list[Shard],
    *,
    on_finished: Callable[[str, int, str], None],
    shard_type: type[ShardWriter] = ShardWriter,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "converting",
    workers: int = WORKERS,
) -> dict[str, str]:
    """Stream every tensor of the `todo` shards into place (ShardWriter) or against what is there
    (ShardChecker, for verify); returns each shard's sha256 and calls on_finished(name, size, sha256).

    Experts convert on WORKERS threads; a full shard is finished on one more, so the workers never wait
    on the disk. Shards are hashed as they are written or read.
    """
    wanted = {t.name for shard in todo for t in shard.tensors}
    kinds: dict[str, set[str]] = {}  # expert group -> its tensors to write
    for t in plan.tensors:
        if t.group is not None and t.name in wanted:
            kinds.setdefault(t.group.prefix, set()).add(t.kind)

    def finish(writer: ShardWriter) -> tuple[str, str]:
        name, sha256 = writer.finish()
        on_finished(name, writer.size, sha256)
        return name, sha256

    hashes, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over experts instead: no oversubscription of small ops
    with (
        ThreadPoolExecutor(workers) as pool,
        ThreadPoolExecutor(1) as finisher,
        tqdm(
            total=sum(s.nbytes for s in todo), unit="B", unit_scale=True, desc=desc, disable=None if progress else True
        ) as bar,
    ):
        finishing = []
        sink = ShardSet(
            out, plan, on_full=lambda w: finishing.append(finisher.submit(finish, w)), on_bytes=bar.update,
            shard_type=shard_type,
        )  # fmt: skip
        try:
            todo_names = {shard.name for shard in todo}
            for shard in sink.empty_shards():  # header only: no tensor byte will open them
                if shard.name in todo_names:
                    sink.on_full(shard_type(out / shard.name, shard.tensors))
            for t in plan.tensors:
                if t.name not in wanted:
                    continue
                if t.source is not None:
                    copy_tensor(source, t.source, sink)
                elif t.group.prefix in kinds:
                    group_kinds = kinds.pop(t.group.prefix)
                    write_group(
                        source, t.group, sink, device=device, pool=pool, in_flight=workers + 1, kinds=group_kinds
                    )
                    _release_freed_memory()
                for done in [f for f in finishing if f.done()]:
                    done.result()  # a shard that failed to finish stops the run now
            hashes.update(f.result() for f in finishing)
        except BaseException:
            sink.abort()
            raise
        finally:
            torch.set_num_threads(threads)
    return hashes


def _release_freed_memory() -> None:
    """Hand memory freed by a finished group back to the OS (glibc keeps it in per-thread arenas),
    so that peak memory stays flat over many layers."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
