"""Seconds per training iteration of a method against its baseline step, measured side by side in one process.

    python benchmarks/step_cost.py selftuning [--repeats 20] [method flags...]

Each `benchmarks/steps/<method>.py` defines `add_args(parser)` (optional) and `build(args)`, which returns an ordered
dict of name -> step function; each function runs one full training iteration on fixed synthetic batches. The FIRST
entry is the baseline. Steps are timed in alternation (a, b, a, b, ...) so that machine noise hits all of them alike;
the printed ratio is median(step) / median(baseline).
"""
import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a module of benchmarks/steps/, e.g. selftuning, debiaspl, metasemi")
    parser.add_argument("--repeats", type=int, default=15, help="timed iterations per step (default: 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per step first (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    known, _ = parser.parse_known_args()
    steps = importlib.import_module(f"steps.{known.method}")
    if hasattr(steps, "add_args"):
        steps.add_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fns = steps.build(args)
    names = list(fns)
    for _ in range(args.warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    print(f"{args.method}: {args.repeats} alternating iterations, {args.threads} threads, "
          f"flags {' '.join(sys.argv[2:]) or '(defaults)'}")
    for name in names:
        med = statistics.median(times[name])
        print(f"  {name:<40s} {med * 1000:9.1f} ms/iter   ratio {med / base:5.2f}x")


if __name__ == "__main__":
    main()
