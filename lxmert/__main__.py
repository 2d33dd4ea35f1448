"""Command line: python -m lxmert <command> --config run/configs/X.yaml [key.sub=value ...]"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from .config import ConfigError, describe, load_config
from .io import InputError

COMMANDS = {
    "generate": "write the embedded benchmark of the config (done automatically by the other commands)",
    "finetune": "dense fine-tune + evaluation + question-only baseline for every seed",
    "lottery": "lottery-ticket study: dense fine-tune, then pruning levels x modes x seeds",
    "debias": "compress-and-debias study: stage 1 / 2 / 3 grid",
    "plots": "redraw plots and tables from the JSON results of the config's experiment",
    "keys": "list every config key with its default and help",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lxmert", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    parser.add_argument("--config", help="experiment YAML file (run/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="single values, e.g. train.epochs=2 seeds=[0,1]")
    args = parser.parse_intermixed_args(argv)
    if args.command == "keys":
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        _quiet_transformers()
        return _run(args.command, cfg)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130


def _quiet_transformers() -> None:
    """No per-tensor progress bars when weights load or save: the log says what was loaded."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run(command: str, cfg) -> int:
    from .training import TrainingDiverged

    try:
        if command == "generate":
            from .data import prepare_embedded

            prepare_embedded(cfg)
        elif command == "finetune":
            from .finetune import run_finetune

            run_finetune(cfg)
        elif command == "lottery":
            from .lottery import run_lottery

            run_lottery(cfg)
        elif command == "debias":
            from .debias import run_debias

            run_debias(cfg)
        elif command == "plots":
            from .debias import redraw as redraw_debias
            from .lottery import redraw

            redraw(cfg)
            redraw_debias(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: {e}", file=sys.stderr)
            return 4
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
