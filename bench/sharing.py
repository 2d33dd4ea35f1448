"""Training steps per second of the embedded model when a machine's cores are shared by two processes.

    python -m bench.sharing [--seconds S] [--no-append]

Runs the `tiny` training step of bench/training.py (the embedded benchmark's model) in separate processes:
alone with torch's default threads (one per core) and with one thread, then two processes at once, each
with the default threads (oversubscribed: the situation of two studies on one box) and each with one
thread (what the study commands do on a machine without CUDA: one single-threaded worker per core,
lxmert/core/scheduler.py). "Fair share" is half of what one process alone gets with the default threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORKER = "--worker"


def _worker(seconds: float) -> None:
    import torch

    from bench.training import SIZES, Step, random_batch

    size = SIZES["tiny"]
    step = Step(size, torch.device("cpu"), "fp32", False, "plain")
    batch = random_batch(size, size.cpu_batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    for _ in range(5):
        step(batch)
    start, n = time.time(), 0
    while time.time() - start < seconds:
        step(batch)
        n += 1
    print(json.dumps({"threads": torch.get_num_threads(), "steps_per_s": n / (time.time() - start)}))


def _run(count: int, threads: int | None, seconds: float) -> list[dict]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.sharing", WORKER, str(seconds)], env=env,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
             for _ in range(count)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == WORKER:
        _worker(float(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds of each process")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to docs/PERFORMANCE.md")
    args = parser.parse_args()
    from bench.common import append

    load = os.getloadavg()[0]
    alone = _run(1, None, args.seconds)[0]
    rows = [["1 process, default threads", alone["threads"], f"{alone['steps_per_s']:.1f}", "-", "1.00"]]
    fair = alone["steps_per_s"] / 2
    for label, count, threads in [("1 process, 1 thread", 1, 1), ("2 processes, default threads each", 2, None),
                                  ("2 processes, 1 thread each (the study workers)", 2, 1)]:
        got = _run(count, threads, args.seconds)
        each = [g["steps_per_s"] for g in got]
        share = "-" if count == 1 else " / ".join(f"{e / fair:.2f}" for e in each)
        rows.append([label, got[0]["threads"], " / ".join(f"{e:.1f}" for e in each), share,
                     f"{sum(each) / alone['steps_per_s']:.2f}"])
    notes = (f"Steps/s of the `tiny` training step (batch 32) per process; 'of fair share': each process's steps/s "
             f"divided by half of what one process gets alone with the default threads; 'total vs alone': all "
             f"processes' steps/s together over one process alone. Load average {load:.2f} at the start, "
             f"{os.getloadavg()[0]:.2f} at the end; {args.seconds:g} s per process.")
    text = append("Two processes on one machine: threads per process", ["run", "torch threads", "steps/s",
                  "of fair share", "total vs alone"], rows, notes)
    if args.no_append:
        from bench.common import DOC

        DOC.write_text(DOC.read_text()[: -len(text) - 1])


if __name__ == "__main__":
    main()
