"""Shared helpers of the benchmark scripts: machine description, peak memory, appending to PERFORMANCE.md."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import threading
import time
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {mem:.0f} GiB RAM, {gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self):
        self.base, self.peak, self.running = rss_gib(), rss_gib(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss_gib())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_gib())

    @property
    def extra_gib(self) -> float:
        return self.peak - self.base


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def append(title: str, header: list[str], rows: list[list], notes: str = "", doc: Path = DOC) -> str:
    """Print a Markdown table and append it, with the machine and date, to `doc` (docs/PERFORMANCE.md)."""
    lines = [f"### {title}", "", f"Machine: {machine()}. Date: {datetime.date.today().isoformat()}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    print(text)
    doc.parent.mkdir(exist_ok=True)
    with open(doc, "a") as fh:
        fh.write("\n" + text)
    return text
