"""The `plots` command: every plot and table of an experiment again from its JSON results (no training)."""
from __future__ import annotations

from ..core.config import Config
from . import debias_report, lottery_report


def redraw_all(cfg: Config) -> None:
    lottery_report.redraw(cfg)
    debias_report.redraw(cfg)
