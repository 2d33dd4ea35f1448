"""Saved units after a study: evaluate one on any split, write a test-server submission, export it.

    python -m lxmert evaluate --config X --unit seed_0/dense [--split minival ...] [--weights best|final]
    python -m lxmert predict  --config X --unit seed_0/iterative_global/low_magnitude/level_40 --split test --out F
    python -m lxmert export   --config X --unit seed_0/bce-lpf/s50/stage3 --out FOLDER

A unit is named as its folder under models/<experiment>/ (and its predictions under result/<experiment>/
predictions/): seed_0/dense, seed_0/<schedule>_<scope>/<mode>/level_<pct>, seed_0/stage1_<loss>,
seed_0/<s1>-<s2>/<sparsity>/stage2 or /stage3, seed_0/control_<s1>-<s2>, seed_0/lottery/<sparsity>.
`best` are the best-on-valid weights a study evaluates its test splits with (the default), `final` those of the
last epoch.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core import distributed as dist
from ..core import paths
from ..core.config import Config
from ..core.errors import InputError
from ..core.files import atomic_folder, load_tensors, read_json, read_object, save_tensors, write_json, write_text
from ..core.paths import Run
from ..core.settings import setting_changes
from ..data.datasets import VQADataset, load_split
from ..modeling.vqa import VQAModel, model_from_config
from ..prune.masks import measure_weights
from ..prune.prunable import prunable_tensors
from ..prune.structure import compact_structure, shrink
from ..train.checkpoints import load_weights
from ..train.evaluation import accuracy, predict, predictions_json
from .context import Context, init_settings
from .debias import stage2_weights

log = logging.getLogger("lxmert")


@dataclass
class Saved:
    """What a finished unit keeps: its weights, its mask (if any), its result row and settings."""

    name: str
    weights: Path | dict  # a file, or the state rebuilt from what the unit kept
    mask: Optional[Path]
    result: Path
    settings: Path
    study_b: bool  # study B's masked set (debias.prunable) rather than study A's (lottery.prunable)


def unit_settings_file(folder: Path, top: Path) -> Path:
    """The settings.json of the unit a folder belongs to (a level of an iterative chain, a study-B stage)."""
    for candidate in [folder, *folder.parents]:
        if (candidate / paths.SETTINGS).exists():
            return candidate / paths.SETTINGS
        if candidate == top:
            break
    raise InputError(f"{folder}: no {paths.SETTINGS} in it or above it: not a unit of this experiment")


def _available(ctx: Context) -> list[str]:
    return sorted(str(p.parent.relative_to(ctx.paths.models)) for p in ctx.paths.models.rglob(paths.RESULT))


def saved_unit(ctx: Context, name: str, which: str) -> Saved:
    """The saved weights (best or final) of a finished unit, refused with the names of those there are."""
    folder = ctx.paths.unit(name.strip("/"))
    result = folder / paths.RESULT
    if not result.exists():
        units = _available(ctx)
        raise InputError(f"--unit {name}: no finished unit {folder} in experiment '{ctx.cfg.experiment}' (finished: "
                         f"{', '.join(units[:6]) or 'none'}{', ...' if len(units) > 6 else ''})")
    weights: Path | dict
    settings = unit_settings_file(folder, ctx.paths.models)
    # study B's start points as the unit recorded them (stages 2 and 3 start from the previous stage's final or
    # best-on-valid weights and mask: debias.stage_start)
    start = read_json(settings, "unit settings").get("debias.stage_start", "final")
    if (folder / paths.HEADS).exists():  # a study-B stage 2: its weights are rebuilt exactly when dropped
        stage1 = ctx.paths.run(paths.stage1(int(name.split("/")[0].removeprefix("seed_")), name.split("/")[1]
                                            .split("-")[0])).weights(start)
        weights, run_folder = stage2_weights(stage1, folder, which), folder
    else:
        levels = [p for p in sorted(folder.glob("level_*")) if (p / paths.RUN).is_dir()]
        run_folder = levels[0] if not (folder / paths.RUN).is_dir() and len(levels) == 1 else folder
        weights = Run(run_folder / paths.RUN).weights(which)
        if not weights.exists():
            raise InputError(f"--unit {name}: its {which} weights were not kept (checkpoints.keep: minimal); to "
                             f"get them back remove {run_folder / paths.RUN} and {result} and run the study again "
                             "with checkpoints.keep=all: the unit retrains from its start with its mask and seed "
                             "(the same weights on a CPU)")
    mask = run_folder / (paths.BEST_MASK if (folder / paths.HEADS).exists() and which == "best" else paths.MASK)
    if folder.name == "stage3":  # stage 3 trains under the stage-2 mask it started from
        mask = folder.parent / "stage2" / (paths.MASK if start == "final" else paths.BEST_MASK)
    _check_made_like(ctx, name, settings)
    kind = name.strip("/").split("/")[1] if "/" in name.strip("/") else ""
    study_a = kind == "dense" or kind.startswith(("iterative_", "oneshot_"))
    return Saved(name, weights, mask if mask.exists() else None, result, settings, not study_a)


def _check_made_like(ctx: Context, name: str, settings: Path) -> None:
    """Refuse a unit made with other data or another model than the config builds (its weights would load into
    another model, or be scored on other questions)."""
    recorded = read_json(settings, "unit settings")
    mine = init_settings(ctx.cfg)
    changed = setting_changes({k: v for k, v in recorded.items() if k in mine}, mine, shown=4)
    if changed:
        raise InputError(f"--unit {name}: {settings} was made with other settings ({changed}); evaluate it with "
                         "the config that made it")


def _model(ctx: Context, saved: Saved) -> VQAModel:
    model = ctx.new_model(int(saved.name.split("/")[0].removeprefix("seed_")))
    load_weights(model, saved.weights, Path(saved.name))
    return model


def _dataset(ctx: Context, split: str) -> VQADataset:
    """A split of the config, or any other question file in data.root (a test server split added later)."""
    if split in ctx.splits:
        return ctx.dataset(split)
    path = Path(ctx.cfg.data.root) / f"{split}.json"
    if not path.exists():
        raise InputError(f"--split {split}: no question file {path}")
    data = ctx.data
    d = ctx.cfg.data
    loaded = load_split(path, data.tokenizer, data.vocab, data.store, d.max_seq_length, d.special_tokens)
    return VQADataset(loaded, data.store, data.num_answers, data.qtype_index, d.mask_padding)


def _subject(ctx: Context, unit: Optional[str], exported: Optional[str], which: str) -> tuple[VQAModel, str]:
    """The model a unit command works on: a finished unit's weights, or a compact export (--exported)."""
    if exported:
        model = load_compact(exported)
        answers = read_json(Path(exported) / COMPACT_STRUCTURE, "compact structure")["answers"]
        if answers != len(ctx.data.vocab):
            raise InputError(f"--exported {exported}: {answers} answers, the config's data has {len(ctx.data.vocab)}")
        return model, str(exported)
    return _model(ctx, saved_unit(ctx, unit, which)), unit


def evaluate_unit(cfg: Config, unit: Optional[str], splits: list[str], which: str = "best",
                  exported: Optional[str] = None) -> dict[str, dict]:
    """Accuracy (overall and per answer type) of a saved unit (or a compact export) on every labelled split asked
    for (default: the config's validation and test splits), as its study computed them."""
    ctx = Context.load(cfg)
    model, unit = _subject(ctx, unit, exported, which)
    out = {}
    for split in splits or ctx.labelled:
        ds = _dataset(ctx, split)
        if not ds.split.has_labels:
            raise InputError(f"--split {split}: the split has no labels (use predict for a test-server split)")
        out[split] = accuracy(ds, predict(model, ds, cfg.train.eval_batch_size, dist.device(), cfg.train.precision,
                                                cfg.data.num_workers))
    for split, acc in out.items():
        per_type = ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k not in ("overall", "questions"))
        log.info("%s (%s weights) on %s: %.2f (%s; %d questions)", unit, which, split, acc["overall"], per_type,
                 acc["questions"])
    return out


def predict_unit(cfg: Config, unit: Optional[str], split: str, out: Optional[str], which: str = "best",
                 exported: Optional[str] = None) -> Path:
    """A submission file for the official evaluation server (EvalAI's VQA format, [{"question_id", "answer"}],
    one answer for every question of the split) from a saved unit or a compact export (then --out is needed)."""
    ctx = Context.load(cfg)
    model, label = _subject(ctx, unit, exported, which)
    ds = _dataset(ctx, split)
    preds = predict(model, ds, cfg.train.eval_batch_size, dist.device(), cfg.train.precision, cfg.data.num_workers)
    path = Path(out) if out else ctx.paths.predictions(label) / f"{split}.json"
    if path.is_dir():
        raise InputError(f"--out {path}: is a folder; give the file to write")
    write_json(path, predictions_json(ds, preds, ctx.data.vocab.label2ans), indent=None)
    log.info("%s: %d answers for %s -> %s", label, len(preds), split, path)
    return path


# -- export ------------------------------------------------------------------------------------------------

EXPORT_RECORD = "export.json"


COMPACT_WEIGHTS, COMPACT_STRUCTURE, COMPACT_CONFIG = "compact.safetensors", "structure.json", "encoder_config.json"


def export_unit(cfg: Config, unit: str, out: str, overwrite: bool = False, which: str = "best",
                compact: bool = False) -> Path:
    """A unit as a folder `transformers` loads with from_pretrained: LxmertForQuestionAnswering (config with the
    answer list as id2label, safetensors with the mask applied) for an LXMERT model with LXMERT's answer head,
    the encoder plus head.safetensors otherwise; the tokenizer, answers.json, the bit-packed mask and a model
    card (README.md, export.json: sparsity overall and per modality, accuracy, settings, commit).

    `compact`: the model physically smaller instead: every attention head and feed-forward neuron whose
    weights are all zero removed, the matrices shrunk (prune.structure.shrink), as compact.safetensors with
    structure.json (the heads and neurons kept) and encoder_config.json; load_compact reads it back
    (`python -m lxmert evaluate --exported FOLDER`). Zeros that form no whole head or neuron stay."""
    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise InputError(f"--out {folder}: exists and is not empty; nothing is replaced: give a new folder or pass "
                         "--overwrite")
    ctx = Context.load(cfg)
    saved = saved_unit(ctx, unit, which)
    model = _model(ctx, saved)
    patterns = cfg.debias.prunable if saved.study_b else cfg.lottery.prunable
    report = measure_weights(model, prunable_tensors(model, patterns))
    row = read_json(saved.result, "unit result")
    source = str(saved.weights) if isinstance(saved.weights, Path) else f"{saved.name} (rebuilt from its masks)"
    structure = None
    if compact:
        structure = compact_structure(model, prunable_tensors(model, patterns))
        before = sum(p.numel() for p in model.parameters())
        shrink(model, structure)
        structure = {"family": model.family, "head": cfg.model.head, "answers": len(ctx.data.vocab),
                     "parameters": {"before": before, "after": sum(p.numel() for p in model.parameters())},
                     **{kind: {"kept": sum(len(v) for v in units.values()),
                               "of": sum(_units_of(model, kind, name) for name in units), "modules": units}
                        for kind, units in structure.items()}}
    card = {"unit": unit, "experiment": cfg.experiment, "weights": which, "source": source,
            "sparsity": {"overall": report["overall"], "by_modality": report["by_modality"],
                         "prunable": report["prunable"], "prunable_set": list(patterns)},
            "accuracy": _recorded_accuracy(row, which, cfg.data.valid),
            "settings": read_json(saved.settings, "unit settings"),
            "made_with": row.get("environment"), "exported_with": ctx.environment,
            "answers": len(ctx.data.vocab), "loads_with": _loader(model)}
    if structure is not None:
        card["loads_with"] = (f"python -m lxmert evaluate --config CONFIG --exported {folder} (the project's "
                              "lxmert.studies.saved.load_compact: the heads and neurons kept are in structure.json)")
        card["compact"] = {k: v for k, v in structure.items() if k in ("parameters", "heads", "neurons")}
    with atomic_folder(folder, overwrite=True) as tmp:
        if structure is None:
            _save_model(model, ctx, tmp)
        else:
            save_tensors(tmp / COMPACT_WEIGHTS, model.state_dict())
            write_json(tmp / COMPACT_STRUCTURE, structure)
            write_json(tmp / COMPACT_CONFIG, model.encoder.config.to_dict())
        ctx.data.tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "answers.json", ctx.data.vocab.label2ans)
        if saved.mask is not None:
            shutil.copyfile(saved.mask, tmp / paths.MASK)
        write_json(tmp / EXPORT_RECORD, card)
        write_text(tmp / "README.md", _card_text(card))
    log.info("exported %s (%s weights, sparsity %.2f %%) to %s", unit, which, report["overall"], folder)
    if structure is not None:
        counts = ", ".join(f"{v['kept']} of {v['of']} {k} kept" for k, v in structure.items()
                           if k in ("heads", "neurons"))
        size = structure["parameters"]
        log.info("compact: %s; %d -> %d parameters", counts, size["before"], size["after"])
        if size["after"] == size["before"]:
            log.warning("compact: no head or neuron of %s is wholly pruned (a unit of single weights: "
                        "lottery.granularity weights), so the compact model is as large as the masked one", unit)
    return folder


def _units_of(model: VQAModel, kind: str, name: str) -> int:
    """Heads of an attention module or neurons of a feed-forward block in the full-size encoder config."""
    config = model.encoder.config
    return config.num_attention_heads if kind == "heads" else config.intermediate_size


def load_compact(folder: str | Path) -> VQAModel:
    """A compact export (export --compact) as a model: the full-size skeleton from encoder_config.json, cut to
    structure.json's heads and neurons, then its weights (every key and shape must match)."""
    folder = Path(folder)
    for name in (COMPACT_WEIGHTS, COMPACT_STRUCTURE, COMPACT_CONFIG):
        if not (folder / name).is_file():
            raise InputError(f"--exported {folder}: no {name}; a compact export (export --compact) holds "
                             f"{COMPACT_WEIGHTS}, {COMPACT_STRUCTURE} and {COMPACT_CONFIG}")
    structure = read_object(folder / COMPACT_STRUCTURE, ("family", "head", "answers"), "compact structure")
    model = model_from_config(structure["family"], read_json(folder / COMPACT_CONFIG, "encoder config"),
                              structure["answers"], structure["head"])
    shrink(model, {kind: structure[kind]["modules"] for kind in ("heads", "neurons") if kind in structure})
    state = load_tensors(folder / COMPACT_WEIGHTS)
    own = model.state_dict()
    wrong = sorted(k for k in set(state) | set(own) if k not in state or k not in own or state[k].shape != own[k].shape)
    if wrong:
        raise InputError(f"{folder / COMPACT_WEIGHTS}: does not fit {COMPACT_STRUCTURE} ({len(wrong)} keys differ, "
                         f"e.g. {wrong[0]})")
    model.load_state_dict(state)
    return model.to(dist.device())


def _loader(model: VQAModel) -> str:
    if model.family == "lxmert" and _lxmert_head(model):
        return "transformers.LxmertForQuestionAnswering.from_pretrained(folder)"
    return (f"transformers.{type(model.encoder).__name__}.from_pretrained(folder) for the encoder; the answer head's "
            "weights are head.safetensors (keys head.<layer>.<param>, the project's modeling.vqa layout)")


def _lxmert_head(model: VQAModel) -> bool:
    """Whether the answer head is LXMERT's own (Linear, GeLU, LayerNorm, Linear), which transformers has."""
    return [type(m).__name__ for m in model.head] == ["Linear", "GELU", "LayerNorm", "Linear"]


def _save_model(model: VQAModel, ctx: Context, tmp: Path) -> None:
    if not (model.family == "lxmert" and _lxmert_head(model)):
        model.encoder.save_pretrained(str(tmp))
        save_tensors(tmp / "head.safetensors", {f"head.{k}": v for k, v in model.head.state_dict().items()})
        return
    from transformers import LxmertForQuestionAnswering

    labels = ctx.data.vocab.label2ans
    config = model.encoder.config.__class__.from_dict({
        **model.encoder.config.to_dict(), "num_qa_labels": len(labels), "id2label": dict(enumerate(labels)),
        "label2id": {a: i for i, a in enumerate(labels)}, "architectures": ["LxmertForQuestionAnswering"]})
    qa = LxmertForQuestionAnswering(config)
    state = {f"lxmert.{k}": v for k, v in model.encoder.state_dict().items()}
    state.update({f"answer_head.logit_fc.{k}": v for k, v in model.head.state_dict().items()})
    missing, unexpected = qa.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("obj_predict_head", "cls.")) for k in missing):
        raise InputError(f"export: the model does not map onto LxmertForQuestionAnswering (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    qa.save_pretrained(str(tmp))


def _recorded_accuracy(row: dict, which: str, valid: str) -> dict:
    """The accuracy the study recorded for these weights, per split (test splits of study A: best weights only)."""
    if "retrained_by_type" in row:  # a level of study A
        return {valid: row["retrained_by_type"] if which == "final" else {"overall": row["accuracy_retrained_best"]},
                **(row["tests"] if which == "best" else {})}
    if "tests" in row:  # a dense fine-tune of study A
        return {valid: row[which], **(row["tests"] if which == "best" else {})}
    return {valid: {"overall": row["valid_best" if which == "best" else "valid"]}, **row[which]}


def _card_text(card: dict) -> str:
    acc = "\n".join(f"| {split} | {v.get('overall', '-')} | " + " | ".join(
        str(v.get(t, "-")) for t in ("yes/no", "number", "other")) + " |" for split, v in card["accuracy"].items())
    modalities = ", ".join(f"{m} {v:.2f} %" for m, v in card["sparsity"]["by_modality"].items())
    made = card["made_with"] or {}
    return (f"# {card['experiment']}: {card['unit']} ({card['weights']} weights)\n\n"
            f"Exported by the LXMERT compression project from `{card['source']}`.\n\n"
            f"- Load: `{card['loads_with']}`; the answers are `config.id2label` and answers.json.\n"
            f"- Sparsity measured from the exported weights: {card['sparsity']['overall']:.2f} % of "
            f"{card['sparsity']['prunable']:,} prunable weights ({modalities}); mask.safetensors holds the mask, "
            "bit-packed, where the unit has one.\n"
            f"- Made with commit {made.get('commit', 'unknown')} on {made.get('device', 'unknown')} "
            f"({made.get('gpu') or made.get('cpu', 'unknown')}), torch {made.get('torch', 'unknown')}.\n\n"
            "Accuracy the study recorded (%):\n\n| split | overall | yes/no | number | other |\n|---|---|---|---|---|\n"
            f"{acc}\n\nThe settings that made it are in export.json (`settings`).\n")
