"""Command line: python -m lxmert <command> --config run/configs/X.yaml [key.sub=value ...]

Every command validates the whole config and its overrides before any work. Errors are one `error:` line
with exit code 2 (bad input), 3 (the loss diverged), 4 (disk full) or 130 (interrupted).

On a machine without CUDA a study runs as several cooperating worker processes (one per core, one
intra-op thread each; --workers or LXMERT_WORKERS sets how many): two processes with two threads each on
two cores run about 4x slower than one, while single-threaded workers share the cores fairly. The
workers are forks made after the data is loaded; they take units of work under locks (lxmert.core.scheduler),
so the results are those of one process.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from .core.config import describe, load_config
from .core.errors import InputError, failure

# Commands with options of their own: python -m lxmert <command> --help
TOOLS = {"score": ("data.score", "official VQA accuracy of a predictions file"),
         "prepare": ("data.prepare", "real data -> question files, feature store, tokenizer"),
         "convert": ("modeling.convert", "the LXMERT release model_LXRT.pth -> a transformers folder + QA head")}
COMMANDS = {
    **{name: f"{what}: python -m lxmert {name} --help" for name, (_, what) in TOOLS.items()},
    "check": "validate the config and its overrides, and do nothing else",
    "generate": "write the embedded benchmark of the config (done automatically by the other commands)",
    "pretrain": "make the stand-in pretrained encoder of the embedded benchmark (done automatically when needed)",
    "finetune": "dense fine-tune + evaluation + question-only baseline for every seed",
    "lottery": "lottery-ticket study: dense fine-tune, then pruning levels x modes x seeds",
    "debias": "compress-and-debias study: stage 1 / 2 / 3 grid",
    "plots": "redraw plots and tables from the JSON results of the config's experiment",
    "keys": "list every config key with its default and help",
}
STUDIES = ("finetune", "lottery", "debias")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in TOOLS:
        return _module(TOOLS[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m lxmert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    parser.add_argument("--config", help="experiment YAML file (run/configs/*.yaml)")
    parser.add_argument("--workers", type=int, help="cooperating worker processes of a study (default: the CPU "
                                                    "cores on a machine without CUDA, else 1; LXMERT_WORKERS)")
    parser.add_argument("overrides", nargs="*", help="single values, e.g. train.epochs=2 seeds=[0,1]")
    args = parser.parse_intermixed_args(argv)
    if args.command == "keys":
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.workers is not None and args.workers < 1:
            raise InputError(f"--workers {args.workers}: give at least 1")
        if args.command == "check":
            print(f"{args.config or 'defaults'}: valid (experiment '{cfg.experiment}')")
            return 0
        _quiet_transformers()
        _run(args.command, cfg, args.workers)
        return 0
    except BaseException as e:  # noqa: B036 - every error becomes its one line and exit code
        code, line = failure(e)
        if line is not None:
            print(line, file=sys.stderr)
        elif code == 1:
            traceback.print_exc()
        return code


def _quiet_transformers() -> None:
    """No per-tensor progress bars when weights load or save: the log says what was loaded."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# command -> (module, function) run with the config
RUNNERS = {"generate": ("embedded.generator", "prepare_embedded"), "pretrain": ("embedded.pretrain", "run_pretrain"),
           "finetune": ("studies.dense", "run_finetune"), "lottery": ("studies.lottery", "run_lottery"),
           "debias": ("studies.debias", "run_debias"), "plots": ("studies.redraw", "redraw_all")}


def _module(name: str):
    """A module of the package, imported when its command runs: the study modules load torch and transformers
    (seconds), which `check`, `keys` and --help must not wait for."""
    return importlib.import_module(f".{name}", __package__)


def _run(command: str, cfg, workers: int | None) -> None:
    if workers is not None:
        os.environ["LXMERT_WORKERS"] = str(workers)
    _module("core.scheduler").configure_workers(command in STUDIES)
    module, function = RUNNERS[command]
    getattr(_module(module), function)(cfg)


if __name__ == "__main__":
    sys.exit(main())
