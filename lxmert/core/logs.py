"""The run log: readable lines in logs/<experiment>.log (and the console), JSON lines of metrics in
logs/<experiment>.jsonl; progress bars only where a person watches."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

from . import distributed as dist
from .config import Config
from .paths import Experiment

_METRICS: dict[str, Optional[str]] = {"path": None}


def quiet() -> bool:
    """No progress bars under CI, when output is not a terminal, or on ranks other than 0."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty() or not dist.is_main()


def setup_logging(cfg: Config) -> None:
    """Readable log in logs/<experiment>.log (and the console), JSON lines in logs/<experiment>.jsonl."""
    logger = logging.getLogger("lxmert")
    logger.setLevel(logging.INFO)
    close()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    logging.getLogger("lxmert.modeling").setLevel(logging.INFO if dist.is_main() else logging.WARNING)
    if dist.is_main():
        paths = Experiment(cfg)
        paths.log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(paths.log)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
        _METRICS["path"] = str(paths.metrics)
    else:
        logger.setLevel(logging.WARNING)


def close() -> None:
    """Detach and close every handler of the project's logger and forget the metrics file."""
    logger = logging.getLogger("lxmert")
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    _METRICS["path"] = None


def set_log_prefix(prefix: str) -> None:
    """Mark this process's log lines (a worker of a study)."""
    for handler in logging.getLogger("lxmert").handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S"))


def metrics_log(record: dict) -> None:
    """Append one JSON line to logs/<experiment>.jsonl (rank 0, once logging is set up)."""
    if _METRICS["path"] is not None and dist.is_main():
        with open(_METRICS["path"], "a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
