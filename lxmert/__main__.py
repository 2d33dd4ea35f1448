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
import json
import os
import sys
import traceback

from .core.cli import Parser
from .core.config import describe, load_config, read_config_file
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
    "plan": "the config's units, epochs, samples, GPU-hours and disk, without running anything",
    "evaluate": "accuracy of a finished unit (--unit) or a compact export (--exported) on the config's splits or "
                "the --split ones",
    "predict": "a test-server submission (EvalAI format) of a finished unit (--unit) for --split, to --out",
    "export": "a finished unit (--unit) as a folder transformers loads, with its mask and a model card (--out); "
              "--compact: physically smaller (heads and neurons removed)",
    "keys": "list every config key with its default and help",
}
STUDIES = ("finetune", "lottery", "debias")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in TOOLS:
        return _module(TOOLS[argv[0]][0]).main(argv[1:])
    parser = Parser(prog="python -m lxmert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    parser.add_argument("--config", help="experiment YAML file (run/configs/*.yaml)")
    parser.add_argument("--workers", type=int, help="cooperating worker processes of a study (default: the CPU "
                                                    "cores on a machine without CUDA, else 1; LXMERT_WORKERS)")
    parser.add_argument("--only", help="a study: take only the units whose names match these glob patterns "
                                       "(comma-separated, e.g. 'seed_*/dense': one phase of a grid); the tables are "
                                       "written by the process that finishes the last unit of the study")
    parser.add_argument("--unit", help="evaluate / predict / export: a finished unit, named as its folder under "
                                       "models/<experiment>/, e.g. seed_0/dense or seed_0/bce-lpf/s50/stage3")
    parser.add_argument("--split", action="append", default=[], help="evaluate: a split to score (repeatable; "
                                                                     "default: the config's); predict: the split")
    parser.add_argument("--weights", choices=("best", "final"), default="best",
                        help="evaluate / predict / export: the best-on-valid weights (default) or the last epoch's")
    parser.add_argument("--out", help="predict: the submission file; export: the folder")
    parser.add_argument("--overwrite", action="store_true", help="export: replace a non-empty --out folder")
    parser.add_argument("--compact", action="store_true", help="export: remove the heads and neurons whose weights "
                                                               "are all zero (matrices shrunk; loads with --exported)")
    parser.add_argument("--exported", help="evaluate / predict: a compact export (export --compact) instead of --unit")
    parser.add_argument("--samples-per-second", type=float, help="plan: training throughput (default: the target "
                                                                  "of docs/PERFORMANCE.md, 2,500 on one H100)")
    parser.add_argument("--processes", type=int, default=1, help="plan: units running at once (for the disk peak)")
    parser.add_argument("--study", choices=("lottery", "debias"), help="plan: the study (default: debias when the "
                                                                        "config file has a debias section)")
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
        _check_unit_options(args)
        _quiet_transformers()
        _run(args, cfg)
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


UNIT_COMMANDS = ("evaluate", "predict", "export")


def _plan(args: argparse.Namespace, cfg) -> str:
    plan = _module("studies.plan")
    study = args.study or _study_of(args.config)
    speed = args.samples_per_second or plan.TARGET_SAMPLES_PER_SECOND
    source = "given" if args.samples_per_second else "the target of docs/PERFORMANCE.md, not measured on a GPU"
    if speed <= 0 or args.processes < 1:
        raise InputError("--samples-per-second and --processes must be positive")
    return plan.render(plan.plan(cfg, study, args.config or "defaults"), speed, source, args.processes)


def _study_of(config: str | None) -> str:
    """debias for a config file with a debias section (the study-B configs), else lottery."""
    if config is None:
        return "lottery"
    tree = read_config_file(config)
    return "debias" if isinstance(tree, dict) and "debias" in tree else "lottery"


def _check_unit_options(args: argparse.Namespace) -> None:
    """The options of the unit commands, before any work."""
    if args.command in UNIT_COMMANDS and not args.unit and not (args.exported and args.command != "export"):
        raise InputError(f"{args.command} needs --unit (a finished unit, e.g. seed_0/dense)"
                         + ("" if args.command == "export" else " or --exported (a compact export)"))
    if args.exported and (args.unit or args.command not in ("evaluate", "predict")):
        raise InputError("--exported (a compact export) is an option of evaluate and predict, instead of --unit")
    if args.compact and args.command != "export":
        raise InputError(f"--compact is an option of export, not of {args.command}")
    if args.command == "predict" and args.exported and not args.out:
        raise InputError("predict --exported needs --out (the submission file to write)")
    if args.command == "export" and not args.out:
        raise InputError("export needs --out (the folder to write)")
    if args.command == "predict" and len(args.split) != 1:
        raise InputError("predict needs one --split (the question file to answer, e.g. test)")
    if args.command not in UNIT_COMMANDS and (args.unit or args.split or args.out or args.overwrite):
        raise InputError(f"--unit, --split, --out and --overwrite are options of {', '.join(UNIT_COMMANDS)}, "
                         f"not of {args.command}")


def _run(args: argparse.Namespace, cfg) -> None:
    if args.workers is not None:
        os.environ["LXMERT_WORKERS"] = str(args.workers)
    os.environ.pop("LXMERT_ONLY", None)  # the scheduler's channel for --only, set by this command alone
    if args.only is not None:
        if args.command not in STUDIES:
            raise InputError(f"--only is an option of {', '.join(STUDIES)}, not of {args.command}")
        os.environ["LXMERT_ONLY"] = args.only
    scheduler = _module("core.scheduler")
    scheduler.poll_seconds()  # LXMERT_POLL_SECONDS and LXMERT_WORKERS are checked before any work
    scheduler.configure_workers(args.command in STUDIES)
    if args.command == "plan":
        print(_plan(args, cfg), end="")
        return
    if args.command in UNIT_COMMANDS:
        saved = _module("studies.saved")
        if args.command == "evaluate":
            print(json.dumps(saved.evaluate_unit(cfg, args.unit, args.split, args.weights, args.exported), indent=1))
        elif args.command == "predict":
            saved.predict_unit(cfg, args.unit, args.split[0], args.out, args.weights, args.exported)
        else:
            saved.export_unit(cfg, args.unit, args.out, args.overwrite, args.weights, args.compact)
        return
    module, function = RUNNERS[args.command]
    getattr(_module(module), function)(cfg)


if __name__ == "__main__":
    sys.exit(main())
