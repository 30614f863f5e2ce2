"""The dry run: what a conversion will read, download, write and hold, from the headers alone.

Shape legend: E experts, H hidden, I expert intermediate.
"""

import os
from pathlib import Path

from . import format as fmt
from . import outdir
from .checkpoint import SourceCheckpoint
from .layout import BLOCK
from .outdir import human
from .outputs import small_files
from .plan import Plan
from .stream import BF16_ROWS, WORKERS
from .writer import safetensors_header

# Measured by scripts/bench_convert.py (one full-size MiniMax-M3 layer, cold page cache, fsync) on a
# 2-core, 24 GB machine: output bytes written per second, and the resident set outside the buffers below.
WRITE_RATE = {"materialize": 0.50e9, "derive": 0.53e9}
RATE_MEASURED_ON = "a 2-core, 24 GB machine with a ~0.6 GB/s disk (scripts/bench_convert.py)"
BASE_MEMORY = 240 * 10**6  # interpreter, torch, numpy and mxconvert imported (VmRSS measured)
CARD_ALLOWANCE = 64 * 2**10  # the model card is written last; a few kB


def peak_memory(plan: Plan, *, workers: int = WORKERS) -> int:
    """The converter's peak resident set: one group's scales as read ([E, 2I, H/32] and [E, H, I/32]) and
    the packed copy of w13's while it is written, plus each worker's buffers (an expert's w13 values
    [2I, H], and BF16_ROWS rows of its BF16 copy where the group stores one)."""
    scales = max((g.num_experts * 5 * g.inter * g.hidden // BLOCK for g in plan.groups), default=0)
    per_worker = max(
        (2 * g.inter * g.hidden + (BF16_ROWS * g.hidden * 2 if g.storage != fmt.NATIVE_ONLY else 0)
         for g in plan.groups),
        default=0,
    )  # fmt: skip
    return BASE_MEMORY + scales + workers * per_worker


def report(plan: Plan, source: SourceCheckpoint, *, out_dir: Path, options: dict, from_hub: bool) -> dict:
    """Exact bytes in and out (per storage), the disks they need and have, peak memory and time."""
    small = small_files(source, plan, options)
    shard_bytes = sum(len(safetensors_header(s.tensors)[0]) + s.nbytes for s in plan.shards)
    out_bytes = shard_bytes + sum(len(d) for d in small.values()) + CARD_ALLOWANCE
    storage: dict[str, dict] = {}
    for t in plan.tensors:
        key = t.group.storage if t.group is not None else "passed through"
        entry = storage.setdefault(key, {"groups": set(), "bytes": 0})
        entry["bytes"] += t.nbytes
        if t.group is not None:
            entry["groups"].add(t.group.prefix)
    inputs = [s.name for s in source.shards] + ["config.json", *source.side_files]
    inputs += [n for n in (fmt.INDEX_NAME, fmt.CARD_NAME) if source.files.exists(n)]
    in_bytes = sum(source.files.size(n) for n in inputs)
    disks = [_disk("OUT_DIR", Path(out_dir), out_bytes)]
    if from_hub:
        from huggingface_hub import constants

        disks.insert(0, _disk("Hugging Face cache (download)", Path(constants.HF_HUB_CACHE), in_bytes))
        if disks[0]["device"] == disks[1]["device"]:  # one disk holds both: both must fit at once
            for d in disks:
                d["fits"] = disks[0]["free_bytes"] >= in_bytes + out_bytes
    seconds = out_bytes / WRITE_RATE[options["bf16"]]
    return {
        "source": source.files.repo_id if from_hub else str(source.dir),
        "revision": getattr(source.files, "revision", None),
        "groups": [
            {"prefix": g.prefix, "storage": g.storage, "experts": g.num_experts, "hidden": g.hidden, "inter": g.inter}
            for g in plan.groups
        ],
        "input_bytes": in_bytes,
        "input_files": len(inputs),
        "tensors_in": len(source.tensors),
        "tensors_out": len(plan.tensors),
        "shards_out": len(plan.shards),
        "output_bytes": out_bytes,
        "output_by_storage": {k: {"groups": len(v["groups"]), "bytes": v["bytes"]} for k, v in sorted(storage.items())},
        "disks": [{k: v for k, v in d.items() if k != "device"} for d in disks],
        "peak_memory_bytes": peak_memory(plan),
        "expected_seconds": round(seconds),
        "expected_rate": f"{WRITE_RATE[options['bf16']] / 1e9:.2f} GB/s written, as measured on {RATE_MEASURED_ON}",
        "header_bytes_read": getattr(source.files, "headers_read", None),
    }


def _disk(what: str, path: Path, needed: int) -> dict:
    where = outdir.existing_parent(path)
    free = outdir.free_bytes(where)
    return {"what": what, "path": str(path), "needed_bytes": needed, "free_bytes": free, "fits": free >= needed,
            "device": os.stat(where).st_dev}  # fmt: skip


def render(report: dict) -> str:
    """The report as the CLI prints it: exact byte counts, and the same in decimal units."""
    size = lambda n: f"{n:,} bytes ({human(n)})"  # noqa: E731
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    lines = [f"{'expert group':<60} {'storage':<12} {'E':>4} {'H':>6} {'I':>6}"]
    lines += [f"{g['prefix']:<60} {g['storage']:<12} {g['experts']:>4} {g['hidden']:>6} {g['inter']:>6}"
              for g in report["groups"]]  # fmt: skip
    lines.append(f"source: {report['source']}" + (f" at {report['revision']}" if report["revision"] else ""))
    lines.append(f"input: {size(report['input_bytes'])} in {plural(report['input_files'], 'file')}, "
                 f"{plural(report['tensors_in'], 'tensor')}")  # fmt: skip
    lines.append(f"output: {size(report['output_bytes'])} in {plural(report['shards_out'], 'shard')} and the small "
                 f"files, {plural(report['tensors_out'], 'tensor')}")  # fmt: skip
    for storage, entry in report["output_by_storage"].items():
        groups = plural(entry["groups"], "expert group") if entry["groups"] else "everything else"
        lines.append(f"  {storage:<15} {size(entry['bytes'])}, {groups}")
    for d in report["disks"]:
        verdict = "fits" if d["fits"] else "DOES NOT FIT"
        lines.append(f"{d['what']}: needs {size(d['needed_bytes'])}, {human(d['free_bytes'])} free at {d['path']}: "
                     f"{verdict}")  # fmt: skip
    lines.append(f"estimated peak memory: {human(report['peak_memory_bytes'])}")
    seconds = report["expected_seconds"]
    took = f"{seconds} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    lines.append(f"expected time: about {took} at {report['expected_rate']}; on another machine, the output "
                 "bytes over its disk's write rate")  # fmt: skip
    if report["header_bytes_read"] is not None:
        lines.append(f"read from the Hub: config, index and {size(report['header_bytes_read'])} of shard headers")
    lines.append("dry run: nothing written")
    return "\n".join(lines)
