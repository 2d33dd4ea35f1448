"""Settings records: what a unit of work, a seed's initial weights or the stand-in encoder was computed with,
and the one comparison that refuses a record made under other settings.

A record is a flat {dotted key: value} mapping of config keys. Keys that only add work (seeds, modes,
levels, losses, test splits) are in no record: they extend the grid.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from .config import RENAMED_KEYS, Config, ModelConfig

# The keys that decide what a unit of work computes. Grid keys (seeds, lottery.modes, lottery.levels,
# data.test, the loss lists and sparsities of debias) are not among them: changing those adds or drops units.
DATA_KEYS = ["data.dataset", "data.root", "data.features", "data.train", "data.valid", "data.ans2label",
             "data.max_seq_length", "data.special_tokens", "data.mask_padding", "data.embedded"]
TRAIN_KEYS = ["train.epochs", "train.batch_size", "train.grad_accum", "train.lr", "train.weight_decay",
              "train.warmup", "train.clip", "train.loss", "train.precision", "train.compile", "train.optimizer",
              "train.dense_seed"]

# Keys a record holds only since a later version, with the value a record made without them was computed
# with (so a study started before stays valid when its settings did not change): study B's lottery baseline
# pruned each tensor to the target ('layer') before it honoured lottery.scope; model.answer_prior did not
# exist (the head as loaded: null); the stand-in pretraining clipped at 5.0 and the question-only model
# trained with Adam at lr 2e-3 in batches of 256 before these were keys.
RECORDED_SINCE = {"lottery.scope": "layer", "model.answer_prior": None, "pretrain.clip": 5.0,
                  "blind.lr": 2e-3, "blind.batch_size": 256, "train.optimizer": "adamw", "train.dense_seed": None,
                  "lottery.enforce_masks": True, "lottery.prune_all_parameters": False,
                  "lottery.original_high_level": "named", "data.special_tokens": True, "data.mask_padding": True,
                  "model.head": "lxmert", "debias.stage_start": "final", "lottery.granularity": "weights"}


def model_keys() -> list[str]:
    return [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]


def settings_of(config: dict, keys: list[str]) -> dict:
    """Flat {dotted key: value} of a config dict for the given dotted keys; a section gives all its keys."""
    out = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            out.update(_flatten(node, f"{key}."))
        else:
            out[key] = node
    return out


def unit_settings(cfg: Config, keys: list[str], **overrides: Any) -> dict:
    """{dotted key: value} of the config for `keys` (sections expand to all their keys), with overrides
    for what a unit sets itself (e.g. the loss of a study-B stage: train__loss)."""
    out = settings_of(cfg.to_dict(), keys)
    for key, value in overrides.items():
        out[key.replace("__", ".")] = value
    return out


def plain(value: Any) -> Any:
    """A settings value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def setting_changes(recorded: dict, current: dict, shown: int) -> str:
    """'key old -> new, ...' for every key whose recorded value differs from the current one (the first
    `shown`, then ', ...'), '' when none does. A renamed key reads under its new name; a key missing from
    the record reads as its RECORDED_SINCE value; current values are compared as they read back from JSON."""
    recorded = {RENAMED_KEYS.get(k, k): v for k, v in recorded.items()}
    recorded = {**{k: v for k, v in RECORDED_SINCE.items() if k in current}, **recorded}
    changed = sorted(k for k in set(recorded) | set(current)
                     if recorded.get(k, "<unset>") != plain(current.get(k, "<unset>")))
    return ", ".join(f"{k} {recorded.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}" for k in changed[:shown]) \
        + (", ..." if len(changed) > shown else "")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
