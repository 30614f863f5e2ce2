"""Benchmark the converter on MiniMax-M3's real expert shapes, beside a plain copy of the same bytes.

    python scripts/bench_convert.py [--layers 1] [--bf16 materialize|derive] [--json out.json] [--keep]

Writes a synthetic checkpoint (H 6144, I 3072, 128 experts per MoE layer; attention, dense and other
tensors tiny) into a work dir, converts it in a child process, and measures wall time, bytes read and
written, GB/s, the child's peak RSS (os.wait4 rusage) and its /proc I/O counters. In the same run it
copies the input files, then the output files, with a userspace read/write loop (no reflink or
sendfile): the ratio compares throughput in bytes written. Every timed step starts with its input
evicted from the page cache. Timings include fsync of what was written
(--no-fsync leaves it to the page cache). One full-size layer: 7.25 GB in, about 21.7 GB out with
materialized BF16 copies; the work dir needs in + out + one output shard of free disk.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

H, I, E = 6144, 3072, 128  # MiniMax-M3's hidden, expert intermediate, experts
CHUNK = 16 * 2**20
CHILD = """import json, sys
from mxconvert.convert import convert
convert(model_dir=sys.argv[1], out_dir=sys.argv[2], bf16=sys.argv[3], max_shard_size=sys.argv[4],
        force=True, progress=False)
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print("BENCH_IO " + json.dumps({k: int(v) for k, v in io.items()}))
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
VERIFY_CHILD = """import sys
from mxconvert.verify import verify
verify(out_dir=sys.argv[1], source=sys.argv[2] if sys.argv[2] != "-" else None, full=True)
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def expected_bytes(layers: int, bf16: str) -> tuple[int, int]:
    """(input, output) bytes of the experts alone: FP8 + scales in; + BF16 copies out unless derive."""
    values = layers * E * 3 * H * I
    fp8 = values + values // 32
    return fp8, fp8 + (2 * values if bf16 == "materialize" else 0)


def make_full_size_source(
    out_dir: Path,
    *,
    layers: int,
    fp8_values: str = "mxfp8",
    num_shards: int = 2,
    experts: int = E,
    hidden: int = H,
    intermediate: int = I,
    edges: bool = True,
) -> Path:
    """A seeded MiniMax-M3-shaped source: full-size MoE layers (3 + layers in all; their shared expert is
    intermediate wide, as vLLM builds it), everything else tiny."""
    return make_tiny_checkpoint(
        out_dir,
        seed=0,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_experts=experts,
        top_k=4,
        num_hidden_layers=3 + layers,
        num_dense_layers=3,
        mtp=False,
        num_shards=num_shards,
        dense_intermediate_size=64,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=128,
        vocab_size=256,
        fp8_values=fp8_values,
        edges=edges,
    )


def files_of(root: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def fsync_files(paths, *, evict: bool = False) -> None:
    """fsync each file; with evict, also drop it from the page cache, so the next reader starts cold
    (as a 414 GB checkpoint does: it never fits in memory)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if evict:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_copy(sources: list[Path], dest_dir: Path, *, fsync: bool) -> dict:
    """Copy each file through a userspace buffer (+ fsync), timed; each copy is deleted untimed after."""
    buf = bytearray(CHUNK)
    view, seconds, nbytes = memoryview(buf), 0.0, 0
    for src in sources:
        dest = dest_dir / f"copy-{src.name}"
        t0 = time.perf_counter()
        with open(src, "rb", buffering=0) as r, open(dest, "wb", buffering=0) as w:
            while n := r.readinto(buf):
                w.write(view[:n])
                nbytes += n
            if fsync:
                os.fsync(w.fileno())
        seconds += time.perf_counter() - t0
        dest.unlink()
    return {"wall_s": seconds, "read_bytes": nbytes, "written_bytes": nbytes}


def run_child(cmd: list[str], what: str) -> tuple[float, dict, str]:
    """A child process, timed; wait4 gives its own peak RSS and CPU time."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_convert: {what} failed:\n{text[-4000:]}")
    return seconds, {"peak_rss_bytes": _hwm(text), "cpu_s": usage.ru_utime + usage.ru_stime}, text


def _hwm(text: str) -> int:
    """The child's own peak RSS, as it printed it (VmHWM: ru_maxrss would keep this script's peak across
    fork and exec, and this script holds the generated checkpoint's buffers)."""
    line = next(line for line in text.splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def run_verify(out: Path, src: Path | None) -> dict:
    """`verify --source` (every byte against a fresh conversion, streamed) or `verify` (sha256 of every file)."""
    seconds, usage, _ = run_child([sys.executable, "-c", VERIFY_CHILD, str(out), str(src or "-")], "verify")
    read = sum(p.stat().st_size for p in files_of(out))
    read += sum(p.stat().st_size for p in files_of(src, "*.safetensors")) if src else 0
    return {"wall_s": seconds, "read_bytes": read, "written_bytes": 0, **usage}


def run_conversion(src: Path, out: Path, *, bf16: str, max_shard_size: str, via: str, fsync: bool) -> dict:
    """The converter in a child; wait4 gives that child's own peak RSS and CPU time."""
    if via == "api":
        cmd = [sys.executable, "-c", CHILD, str(src), str(out), bf16, max_shard_size]
    else:
        cmd = [
            sys.executable,
            "-m",
            "mxconvert.cli",
            str(src),
            str(out),
            "--force",
            "--no-progress",
            "--bf16",
            bf16,
            "--max-shard-size",
            max_shard_size,
        ]
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if fsync:
            fsync_files(files_of(out))
        seconds = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    if child.returncode != 0:
        sys.exit(f"bench_convert: the converter failed ({child.returncode}):\n{text[-4000:]}")
    io = next((json.loads(line[9:]) for line in text.splitlines() if line.startswith("BENCH_IO ")), {})
    return {
        "wall_s": seconds,
        "peak_rss_bytes": _hwm(text) if "VmHWM" in text else usage.ru_maxrss * 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "proc_io": io,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="full-size MoE layers (after 3 tiny dense ones)")
    ap.add_argument("--bf16", choices=["materialize", "derive"], default="materialize")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument(
        "--fp8-values",
        choices=["mxfp8", "uniform"],
        default="mxfp8",
        help="expert bytes as real MXFP8 weights have them, or every code alike",
    )
    ap.add_argument(
        "--via",
        choices=["api", "cli"],
        default="api",
        help="child runs mxconvert.convert.convert (with /proc I/O counters) or the CLI",
    )
    ap.add_argument("--workdir", help="where the synthetic checkpoint and output go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and output")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false", help="do not fsync inside the timings")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    in_est, out_est = expected_bytes(args.layers, args.bf16)
    free = shutil.disk_usage(work).free
    need = in_est + out_est + 6 * 10**9
    if free < need:
        shutil.rmtree(work)
        sys.exit(f"bench_convert: {work} has {free / 1e9:.1f} GB free, needs about {need / 1e9:.1f} GB")
    src, out = work / "src", work / "out"
    try:
        t0 = time.perf_counter()
        make_full_size_source(
            src, layers=args.layers, fp8_values=args.fp8_values, num_shards=max(2, math.ceil(in_est / 5e9))
        )
        fsync_files(files_of(src))
        gen_s = time.perf_counter() - t0
        in_files = files_of(src, "*.safetensors")
        in_bytes = sum(p.stat().st_size for p in in_files)

        fsync_files(in_files, evict=True)
        conv = run_conversion(
            src, out, bf16=args.bf16, max_shard_size=args.max_shard_size, via=args.via, fsync=args.fsync
        )
        out_files = files_of(out)
        conv.update(read_bytes=in_bytes, written_bytes=sum(p.stat().st_size for p in out_files))
        fsync_files(in_files + out_files, evict=True)
        check_source = run_verify(out, src)
        fsync_files(in_files + out_files, evict=True)
        check_hashes = run_verify(out, None)
        fsync_files(in_files, evict=True)
        copy_in = plain_copy(in_files, work, fsync=args.fsync)
        fsync_files(out_files, evict=True)
        copy_out = plain_copy([p for p in out_files if p.suffix == ".safetensors"], work, fsync=args.fsync)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = {
        "conversion": conv,
        "verify --source": check_source,
        "verify (sha256)": check_hashes,
        "plain copy, input files": copy_in,
        "plain copy, output files": copy_out,
    }
    for r in rows.values():
        r["read_GBps"] = r["read_bytes"] / r["wall_s"] / 1e9
        r["write_GBps"] = r["written_bytes"] / r["wall_s"] / 1e9
    result = {
        "layers": args.layers,
        "bf16": args.bf16,
        "fp8_values": args.fp8_values,
        "via": args.via,
        "fsync": args.fsync,
        "shape": {"hidden": H, "intermediate": I, "experts": E},
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "generate_s": gen_s,
        **rows,
        "ratio_write_throughput_vs_copy": conv["write_GBps"] / copy_out["write_GBps"],
        "ratio_read_throughput_vs_copy": conv["read_GBps"] / copy_in["read_GBps"],
        "ratio_verify_source_vs_conversion_time": check_source["wall_s"] / conv["wall_s"],
        "workdir": str(work) if args.keep else None,
    }
    print(
        f"synthetic checkpoint: {args.layers} MoE layer(s) of {E} x 3 x {H} x {I}, {in_bytes / 1e9:.2f} GB in "
        f"{len(in_files)} shards, written in {gen_s:.1f} s; bf16={args.bf16}, fsync={args.fsync}"
    )
    print(
        f"{'':<26}{'read GB':>9}{'written GB':>12}{'wall s':>9}{'read GB/s':>11}{'write GB/s':>12}{'peak RSS GB':>13}"
    )
    for name, r in rows.items():
        rss = f"{r['peak_rss_bytes'] / 1e9:.2f}" if "peak_rss_bytes" in r else "-"
        print(
            f"{name:<26}{r['read_bytes'] / 1e9:>9.2f}{r['written_bytes'] / 1e9:>12.2f}{r['wall_s']:>9.1f}"
            f"{r['read_GBps']:>11.3f}{r['write_GBps']:>12.3f}{rss:>13}"
        )
    print(f"conversion / plain copy, bytes written per second: {result['ratio_write_throughput_vs_copy']:.2f}")
    print(f"conversion / plain copy, bytes read per second: {result['ratio_read_throughput_vs_copy']:.2f}")
    print(f"verify --source / conversion, wall time: {result['ratio_verify_source_vs_conversion_time']:.2f}")
    print(f"conversion child: {conv['cpu_s']:.1f} s CPU; /proc/self/io {conv['proc_io'] or 'n/a (--via cli)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
