"""Measure where the BF16 experts beat the native MXFP8 path on this GPU, and record the dispatch bands.

    python3 scripts/tune_bands.py [--shape tp8] [--json bands.json] [--write]

Times both whole-experts forwards (CUDA-graph replays, median; scripts/bench_moe.py's harness) over token
counts, then bisects each crossover: bf16_max_tokens is the largest T up to which BF16 wins at every
measured count, bf16_min_tokens the smallest T from which it wins at every measured count (NEVER when
native wins at the largest). --write records them in runtime/_bands_table.py under this device's name,
where the runtime (runtime/bands.py) finds them. Without a GPU it runs a tiny shape under the Triton
interpreter to check the script (wall-clock timings, meaningless).
"""

import argparse
import json
import os
import pprint
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_moe import SHAPES, bench, make_weights, routing  # noqa: E402

from mxconvert.format import NEVER  # noqa: E402  (bf16_min_tokens when native wins above the low band)
from mxconvert.kernels import config as kcfg  # noqa: E402
from mxconvert.kernels.moe import moe_experts_bf16, moe_experts_mxfp8  # noqa: E402

SHAPES = {**SHAPES, "tiny": (8, 128, 64, 2)}
GRID = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
TABLE = ROOT / "runtime" / "_bands_table.py"


class Timer:
    """Median microseconds of both paths at T tokens (cached: bisection revisits counts)."""

    def __init__(self, shape: str, device: str):
        self.e, self.h, self.i, self.k = SHAPES[shape]
        self.device, self.mode = device, kcfg.native_mode(device)
        self.fp8, self.bf = make_weights(self.e, self.h, self.i, device=device)
        self.cache: dict[int, dict[str, float]] = {}

    def __call__(self, t: int) -> dict[str, float]:
        if t not in self.cache:
            x = torch.randn(t, self.h, device=self.device).bfloat16()
            ids, w = routing(t, self.k, self.e, t, device=self.device)
            bf16 = lambda: moe_experts_bf16(x, w, ids, **self.bf)
            native = lambda: moe_experts_mxfp8(x, w, ids, **self.fp8, mode=self.mode)
            self.cache[t] = {"bf16": self._time(bf16), self.mode: self._time(native)}
            print(f"T={t}: " + " ".join(f"{p} {us:.1f}us" for p, us in self.cache[t].items()), flush=True)
        return self.cache[t]

    def _time(self, fn) -> float:
        if self.device == "cuda":
            return bench(fn)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def bf16_wins(self, t: int) -> bool:
        r = self(t)
        return r["bf16"] <= r[self.mode]


def bisect(timer: Timer, lo: int, hi: int, *, wins_at_lo: bool) -> int:
    """The last count in [lo, hi) on the side of lo, where lo and hi disagree on who wins."""
    while hi - lo > max(1, lo // 16):  # within ~6%: finer is below the timings' spread
        mid = (lo + hi) // 2
        if timer.bf16_wins(mid) == wins_at_lo:
            lo = mid
        else:
            hi = mid
    return lo


def tune(timer: Timer, grid: list[int]) -> tuple[int, int]:
    wins = [timer.bf16_wins(t) for t in grid]
    low = 0  # BF16 at T <= low
    for j, t in enumerate(grid):
        if not wins[j]:
            low = bisect(timer, grid[j - 1], t, wins_at_lo=True) if j else 0
            break
    else:
        return grid[-1], grid[-1] + 1  # BF16 everywhere: no native band
    high = NEVER  # BF16 at T >= high
    if wins[-1]:
        j = len(grid) - 1
        while wins[j - 1]:
            j -= 1
        high = bisect(timer, grid[j - 1], grid[j], wins_at_lo=False) + 1
    return low, high


def write_table(device_name: str, entry: dict) -> None:
    from mxconvert.runtime._bands_table import BANDS

    bands = {**BANDS, device_name: entry}
    text = TABLE.read_text()
    head = text[: text.index("BANDS = ")]
    tmp = TABLE.with_suffix(".tmp")
    tmp.write_text(head + "BANDS = " + pprint.pformat(bands, width=110, sort_dicts=True) + "\n")
    tmp.replace(TABLE)
    subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(TABLE)], check=False)  # where ruff is


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default=None, help=f"one of {sorted(SHAPES)} (default tp8 on a GPU, tiny on CPU)")
    ap.add_argument("--tokens", help="comma-separated grid (default: 1 .. 8192)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--write", action="store_true", help=f"record the bands in {TABLE.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape or ("tp8" if device == "cuda" else "tiny")
    grid = [int(v) for v in args.tokens.split(",")] if args.tokens else GRID
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    timer = Timer(shape, device)
    low, high = tune(timer, grid)
    entry = {
        "bf16_max_tokens": low,
        "bf16_min_tokens": high,
        "native_mode": timer.mode,
        "shape": dict(zip(("experts", "hidden", "intermediate", "top_k"), SHAPES[shape])),
        "measured": time.strftime("%Y-%m-%d") + f" torch {torch.__version__}",
    }
    print(f"\n{name}: BF16 at T <= {low} or T >= {high}, else {timer.mode}  ({shape}: E, H, I, k = {SHAPES[shape]})")
    print(f"| T | bf16 us | {timer.mode} us | faster |")
    print("|---|---|---|---|")
    for t, r in sorted(timer.cache.items()):
        print(
            f"| {t} | {r['bf16']:.1f} | {r[timer.mode]:.1f} | {'bf16' if r['bf16'] <= r[timer.mode] else timer.mode} |"
        )
    result = {"device": name, **entry, "timings_us": {str(t): r for t, r in sorted(timer.cache.items())}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.write:
        if device != "cuda":
            sys.exit("tune_bands: --write records GPU measurements only")
        write_table(name, entry)
        print(f"wrote {TABLE}")
    return result


if __name__ == "__main__":
    main()
