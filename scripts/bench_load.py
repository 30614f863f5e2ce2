"""Time loading one full-size MiniMax-M3 MoE layer onto the GPU: stored `--bf16 materialize` vs `--bf16 derive`.

    python3 scripts/bench_load.py [--workdir DIR] [--tp 8] [--json out.json] [--keep]

Builds bench_convert.py's synthetic checkpoint (H 6144, I 3072, 128 experts; make_tiny_checkpoint), converts
it both ways, then times `ConvertedCheckpoint.load_experts` onto the device from a cold page cache (dropped
with /proc/sys/vm/drop_caches where permitted, else each file evicted with posix_fadvise) and from a warm
one. Beside it, in the same run: a plain sequential read of the same files (the storage's limit) and a
pinned host-to-device copy (the bus's limit). Without a GPU, a small shape on the CPU checks the script.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_convert import CHUNK, E, H, I, files_of, fsync_files, make_full_size_source  # noqa: E402

from mxconvert.convert import convert  # noqa: E402
from mxconvert.runtime.loader import ConvertedCheckpoint  # noqa: E402
from mxconvert.runtime.sharding import ONE_RANK, Ranks  # noqa: E402


def evict(files, drop_caches: bool) -> str:
    """Empty the page cache of these files (posix_fadvise), and with drop_caches all of it (root); returns how."""
    fsync_files(files, evict=True)
    if drop_caches:
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "fadvise + drop_caches"
        except OSError as e:
            print(f"drop_caches: {e}; posix_fadvise only", flush=True)
    return "fadvise"


def proc_read_bytes() -> int:
    try:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(io["read_bytes"])
    except (OSError, KeyError):
        return -1


def plain_read(files) -> tuple[int, float]:
    """Sequential read of each file through one userspace buffer: (bytes, seconds)."""
    buf, total = bytearray(CHUNK), 0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - t0


def h2d_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * src.numel() / (time.perf_counter() - t0) / 1e9


def timed_load(ckpt: ConvertedCheckpoint, prefix: str, device: str, ranks: Ranks = ONE_RANK) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    io0, t0 = proc_read_bytes(), time.perf_counter()
    weights = ckpt.load_experts(prefix, device=device, ranks=ranks)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stored = [s for s in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale", "w13_weight_bf16",
                          "w2_weight_bf16") if f"{prefix}.{s}" in ckpt.weight_map]  # fmt: skip
    tp = ranks.tp_size
    return dict(
        weights=weights,
        seconds=seconds,
        bytes_read=sum(ckpt.tensor(f"{prefix}.{s}").nbytes for s in stored) // tp,
        disk_bytes=proc_read_bytes() - io0,
        device_bytes=weights.nbytes(),
        peak_device_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temp dir); needs ~45 GB free")
    ap.add_argument("--experts", type=int, default=None, help="default 128 on a GPU, 4 on CPU")
    ap.add_argument("--tp", type=int, default=8, help="also time one TP rank's slice (warm cache); 1: skip")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--drop-caches", action="store_true", help="also drop the whole page cache (root; the GPU box)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    e, h, i = (args.experts or E, H, I) if device == "cuda" else (args.experts or 4, 256, 128)
    work = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.workdir))
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", shape=dict(E=e, H=h, I=i))
    rows = []
    try:
        t0 = time.perf_counter()
        src = make_full_size_source(work / "src", layers=1, experts=e, hidden=h, intermediate=i)
        print(f"generated {e} experts H {h} I {i} in {time.perf_counter() - t0:.0f}s", flush=True)
        outs = {}
        for mode in ("materialize", "derive"):
            t0 = time.perf_counter()
            convert(model_dir=str(src), out_dir=str(work / mode), bf16=mode, progress=False)
            outs[mode] = work / mode
            print(f"converted --bf16 {mode} in {time.perf_counter() - t0:.0f}s", flush=True)
        shutil.rmtree(src)
        result["h2d_pinned_GBps"] = h2d_gbps() if device == "cuda" else None
        reference = None  # materialize's weights, for the bit-identity check of derive's BF16 copies
        for mode, out in outs.items():
            ckpt = ConvertedCheckpoint(out)
            prefix = next(iter(ckpt.layers))
            files = files_of(out, "*.safetensors")
            for cache in ("cold", "warm"):
                how = evict(files, args.drop_caches) if cache == "cold" else "after a load"
                nbytes, plain_s = plain_read(files)  # the storage's limit, in the same cache state
                if cache == "cold":
                    evict(files, args.drop_caches)
                r = timed_load(ckpt, prefix, device)
                weights = r.pop("weights")
                row = dict(mode=mode, storage=ckpt.layers[prefix], cache=cache, how=how, tp="1/1",
                           plain_read_GBps=nbytes / plain_s / 1e9, **r)  # fmt: skip
                if mode == "materialize" and cache == "warm":
                    reference = weights
                elif mode == "derive":  # the same BF16 bits as the stored copies, at full size
                    row["bf16_bit_identical"] = all(
                        torch.equal(getattr(reference, n).view(torch.int16), getattr(weights, n).view(torch.int16))
                        for n in ("w13_bf16", "w2_bf16")
                    )
                rows.append(row)
                print(f"{mode} {cache}: {r['seconds']:.2f}s {r['bytes_read'] / 1e9:.2f} GB", flush=True)
                weights = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            if args.tp > 1:
                r = timed_load(ckpt, prefix, device, Ranks(tp_rank=0, tp_size=args.tp))
                r.pop("weights")
                rows.append(dict(mode=mode, storage=ckpt.layers[prefix], cache="warm", how="after a load",
                                 tp=f"0/{args.tp}", plain_read_GBps=None, **r))  # fmt: skip
        reference = None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ndevice: {result['device']}  E {e} H {h} I {i}  pinned H2D: {result['h2d_pinned_GBps'] or 0:.1f} GB/s")
    print("| stored as | cache | TP rank | read | from disk | seconds | GB/s | plain read GB/s | ratio | on device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbps, plain = r["bytes_read"] / r["seconds"] / 1e9, r["plain_read_GBps"]
        limit = f"{plain:.2f} | {gbps / plain:.2f}" if plain else "- | -"
        print(
            f"| --bf16 {r['mode']} ({r['storage']}) | {r['cache']} ({r['how']}) | {r['tp']} "
            f"| {r['bytes_read'] / 1e9:.2f} GB | {r['disk_bytes'] / 1e9:.2f} GB | {r['seconds']:.2f} | {gbps:.2f} "
            f"| {limit} | {r['device_bytes'] / 1e9:.2f} GB |"
        )
    for r in rows:
        if "bf16_bit_identical" in r:
            print(f"derived BF16 == stored BF16, bit for bit ({r['cache']}): {r['bf16_bit_identical']}")
    result["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
