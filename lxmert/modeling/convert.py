"""The original LXMERT release checkpoint (model_LXRT.pth) -> a transformers LxmertModel folder plus the
project's answer head, initialised from the release's QA head by answer string.

    python -m lxmert convert --checkpoint data/lxmert/model_LXRT.pth \\
        --answers data/vqa/trainval_ans2label.json --pretrained-answers data/lxmert/all_ans.json \\
        --out data/lxmert/converted

Study A starts from this checkpoint: its encoder plus a QA head whose rows come from the pretrained
LXMERT QA head (9,500 answers) wherever the answer string exists in the task vocabulary. The output
folder loads with `LxmertModel.from_pretrained(out)` (so `model.pretrained: <out>` in a config works)
and holds `head.safetensors` (keys head.0.weight ... head.3.bias, the layout of modeling.answer_head)
and `conversion.json` (what was copied and what was dropped).

Every checkpoint key is accounted for: `bert.*` goes to the encoder (the transformers port keeps the
original module names), `answer_head.logit_fc.{0,2,3}.*` to the head, and the pretraining-only heads
(`cls.*`, `obj_predict_head.*`) are dropped by name. Any other key, any encoder weight the checkpoint
lacks (a whole layer stack included: no `bert.encoder.x_layers.*` is not a model without cross-modality
layers), or a tensor of the wrong shape stops the conversion with one line naming it: a silent partial load
would fine-tune a half-random model.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.cli import Parser, check_output
from ..core.errors import InputError, exit_code
from ..core.files import atomic_folder, read_json, refuse_existing, save_tensors, write_json
from ..data.answers import AnswerVocab
from .vqa import HEAD_FILE, answer_head, head_metadata

ENCODER_PREFIX = "bert."
HEAD_PREFIX = "answer_head.logit_fc."
HEAD_LAYERS = {"0": "head.0", "2": "head.2", "3": "head.3"}
DROPPED_PREFIXES = {
    "cls.": "pretraining head: masked language model and image-text matching",
    "obj_predict_head.": "pretraining head: object / attribute classification and feature regression",
}
DOWNLOAD_HINT = {
    "checkpoint": "download the LXMERT release (870 MB) from http://nlp.cs.unc.edu/data/model_LXRT.pth "
                  "into data/lxmert/ (bash data/download.bash lxmert; see data/README.md)",
    "pretrained answers": "it is all_ans.json of the LXMERT repository (data/lxmert/all_ans.json there); "
                          "bash data/download.bash lxmert puts it in data/lxmert/ (see data/README.md)",
    "answer vocabulary": "it is trainval_ans2label.json from LXMERT's VQA files or from "
                         "python -m lxmert prepare (see data/README.md)",
}


@dataclass
class Checkpoint:
    """A release state dict sorted into where each tensor goes."""

    encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} not found: {path}; {DOWNLOAD_HINT[what]}")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The release's state dict, read without unpickling code (torch.load with weights_only=True, never
    retried without); a DataParallel `module.` prefix is removed."""
    path = Path(path)
    _require(path, "checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for a bad file
        raise InputError(f"{path}: not a PyTorch state dict of tensors ({_load_failure(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"{path}: expected a state dict (tensor name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_failure(error: Exception) -> str:
    """torch.load's error in a few words: its own text spans lines and suggests loading without
    weights_only, which would run whatever code the file holds."""
    text = str(error)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return f"it would call {unsafe.group(1)}; refused without running it: a state dict holds no code"
    if "Weights only load failed" in text:
        return f"{type(error).__name__}: refused by torch's safe loader without running it, not plain tensors"
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'unreadable'}"


def sort_keys(state: dict[str, torch.Tensor], source: str) -> Checkpoint:
    """Place every key, or raise listing the keys that have no place."""
    out, unknown = Checkpoint(), []
    for key, tensor in state.items():
        head = re.fullmatch(re.escape(HEAD_PREFIX) + r"(\d+)\.(weight|bias)", key)
        dropped = next((why for prefix, why in DROPPED_PREFIXES.items() if key.startswith(prefix)), None)
        if key.startswith(ENCODER_PREFIX):
            out.encoder[key.removeprefix(ENCODER_PREFIX)] = tensor
        elif head and head.group(1) in HEAD_LAYERS:
            out.head[f"{HEAD_LAYERS[head.group(1)]}.{head.group(2)}"] = tensor
        elif dropped is not None:
            out.dropped[key] = dropped
        else:
            unknown.append(key)
    if unknown:
        raise InputError(f"{source}: {len(unknown)} key(s) have no place in the converted model and are not a "
                         f"known pretraining head: {', '.join(sorted(unknown)[:10])}")
    return out


# The encoder's three layer stacks: config key -> (module name, what it is).
STACKS = {"l_layers": ("layer", "language"), "x_layers": ("x_layers", "cross-modality"),
          "r_layers": ("r_layers", "object-relationship")}
# Encoder tensors whose shapes give the config: key -> (the config size it gives, which dimension is the hidden size).
SIZED = {"embeddings.word_embeddings.weight": ("vocab_size", 1),
         "embeddings.position_embeddings.weight": ("max_position_embeddings", 1),
         "embeddings.token_type_embeddings.weight": ("type_vocab_size", 1),
         "encoder.layer.0.intermediate.dense.weight": ("intermediate_size", 1),
         "encoder.visn_fc.visn_fc.weight": ("visual_feat_dim", 0),
         "encoder.visn_fc.box_fc.weight": ("visual_pos_dim", 0)}


def _count_layers(encoder: dict[str, torch.Tensor], config_key: str) -> int:
    """The layers of one stack; a stack without any stops the conversion (the model would silently lack it)."""
    stack, what = STACKS[config_key]
    found = {int(m.group(1)) for k in encoder if (m := re.match(rf"encoder\.{stack}\.(\d+)\.", k))}
    if not found:
        raise InputError(f"checkpoint: no bert.encoder.{stack}.* tensors: the {what} layer stack ({config_key}) is "
                         f"missing (the release has 9 language, 5 cross-modality and 5 object-relationship layers)")
    if found != set(range(len(found))):
        raise InputError(f"checkpoint: layers of bert.encoder.{stack} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _shape(tensors: dict[str, torch.Tensor], key: str, rank: int, name: str) -> tuple[int, ...]:
    """The shape of tensors[key] (`name` in the checkpoint), which must have `rank` non-empty dimensions."""
    if key not in tensors:
        raise InputError(f"checkpoint: tensor {name} is missing")
    shape = tuple(tensors[key].shape)
    if len(shape) != rank or 0 in shape:
        raise InputError(f"checkpoint: {name} has shape {shape}, expected {rank} non-empty dimension(s)")
    return shape


def encoder_sizes(enc: dict[str, torch.Tensor]) -> dict[str, int]:
    """The config sizes the encoder's shapes give. The hidden size is the length of the embeddings' LayerNorm
    weight; each other sizing tensor must have it where it belongs (a transposed or truncated one is named)."""
    (hidden,) = _shape(enc, "embeddings.LayerNorm.weight", 1, "bert.embeddings.LayerNorm.weight")
    sizes = {"hidden_size": hidden}
    for key, (size, hidden_dim) in SIZED.items():
        shape = _shape(enc, key, 2, f"bert.{key}")
        if shape[hidden_dim] != hidden:
            raise InputError(f"checkpoint: bert.{key} has shape {shape}, but its dimension {hidden_dim} should be the "
                             f"hidden size {hidden} (of bert.embeddings.LayerNorm.weight); transposed or truncated?")
        sizes[size] = shape[1 - hidden_dim]
    return sizes


def infer_config(ckpt: Checkpoint, num_attention_heads: Optional[int], state: dict[str, torch.Tensor]):
    """The LxmertConfig the tensors were trained with (head count is not visible in shapes: 64-d heads
    unless given)."""
    from transformers import LxmertConfig

    layers = {key: _count_layers(ckpt.encoder, key) for key in STACKS}
    sizes = encoder_sizes(ckpt.encoder)
    hidden = sizes["hidden_size"]
    heads = num_attention_heads or (hidden // 64 if hidden % 64 == 0 else None)
    if not heads or hidden % heads:
        raise InputError(f"--num-attention-heads: hidden size {hidden} needs a head count that divides it")
    extra = {name: _shape(state, key, 1, key)[0] for name, key in (
        ("num_qa_labels", HEAD_PREFIX + "3.bias"), ("num_object_labels", "obj_predict_head.decoder_dict.obj.bias"),
        ("num_attr_labels", "obj_predict_head.decoder_dict.attr.bias")) if key in state}
    return LxmertConfig(num_attention_heads=heads, **layers, **sizes, **extra)


def load_encoder(ckpt: Checkpoint, config):
    """An LxmertModel holding exactly the checkpoint's encoder tensors (no missing, extra or reshaped one)."""
    from transformers import LxmertModel

    model = LxmertModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.encoder))
    extra = sorted(set(ckpt.encoder) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(ckpt.encoder) if expected[k].shape != ckpt.encoder[k].shape)
    shapes = {k: f" {tuple(ckpt.encoder[k].shape)} not {tuple(expected[k].shape)}" for k in reshaped}
    for what, keys in (("missing from the checkpoint", missing), ("unknown to LxmertModel", extra),
                       ("of the wrong shape", reshaped)):
        if keys:
            raise InputError(f"checkpoint: {len(keys)} encoder tensor(s) {what}: "
                             f"{', '.join('bert.' + k + shapes.get(k, '') for k in keys[:10])}")
    model.load_state_dict(ckpt.encoder, strict=True)
    return model


def release_answers(path: str | Path, rows: int) -> list[str]:
    """The answer of each row of the release's QA head: all_ans.json is a list of {"ans": ...};
    a plain list of strings or an answer -> row object is accepted too."""
    path = Path(path)
    _require(path, "pretrained answers")
    data = read_json(path, "pretrained answer list")
    if isinstance(data, dict):
        answers = [""] * len(data)
        for a, i in data.items():
            if not isinstance(i, int) or not 0 <= i < len(data):
                raise InputError(f"{path}: answer '{a}' has row {i!r}, not in 0..{len(data) - 1}")
            answers[i] = a
    elif isinstance(data, list):
        answers = [a.get("ans") if isinstance(a, dict) else a for a in data]
    else:
        raise InputError(f"{path}: expected a list of answers or an answer -> row object")
    if not all(isinstance(a, str) for a in answers):
        raise InputError(f"{path}: every entry must be a string or an object with a string field 'ans'")
    if len(answers) != rows:
        raise InputError(f"{path}: {len(answers)} answers, but the checkpoint's QA head has {rows} rows")
    return answers


def output_rows(ckpt: Checkpoint, hidden: int) -> int:
    """The rows (answers) of the release's QA output layer, 0 without one. Its weight and bias come together
    and fit the head's hidden layers: [rows, 2 x hidden] and [rows]."""
    if "head.3.weight" not in ckpt.head and "head.3.bias" not in ckpt.head:
        return 0
    weight = _shape(ckpt.head, "head.3.weight", 2, HEAD_PREFIX + "3.weight")
    (rows,) = _shape(ckpt.head, "head.3.bias", 1, HEAD_PREFIX + "3.bias")
    if weight != (rows, 2 * hidden):
        raise InputError(f"checkpoint: {HEAD_PREFIX}3.weight has shape {weight}, expected {(rows, 2 * hidden)} "
                         f"(the rows of {HEAD_PREFIX}3.bias, twice the hidden size {hidden})")
    return rows


# The original fine-tuning's conversion of a task answer before it is looked up among the release's answers
# (airsplay/lxmert src/pretrain/qa_answer_table.py, AnswerTable.ANS_CONVERT and convert_ans).
_ANS_CONVERT = {"a man": "man", "the man": "man", "a woman": "woman", "the woman": "woman", "one": "1", "two": "2",
                "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                "ten": "10", "grey": "gray"}


def convert_answer(answer: str) -> str:
    """AnswerTable.convert_ans: lower-case, one trailing period and a leading a/an/the dropped, then the table."""
    if len(answer) == 0:
        return ""
    answer = answer.lower()
    if answer[-1] == ".":
        answer = answer[:-1].strip()
    for article in ("a ", "an ", "the "):
        if answer.startswith(article):
            answer = answer[len(article):].strip()
    return _ANS_CONVERT.get(answer, answer)


def build_head(ckpt: Checkpoint, hidden: int, vocab: AnswerVocab, answers: Optional[list[str]],
               seed: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The project's head as the original fine-tuning builds it (load_lxmert_qa, airsplay/lxmert
    src/pretrain/qa_answer_table.py): the hidden layers from the release; output row and bias of each task
    answer copied from the release's row of convert_answer(answer), matched exactly against the release's
    answer strings, and zero (weight row and bias) for an answer the release does not have. Without the
    release's answer list the output layer stays freshly initialised (std 0.02, bias 0) under `seed`.
    Returns the state and the answers copied."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {f"head.{k}": v for k, v in answer_head(hidden, len(vocab)).state_dict().items()}
    for key in ("head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"):
        if key in ckpt.head:
            if ckpt.head[key].shape != state[key].shape:
                raise InputError(f"checkpoint: {HEAD_PREFIX}{key.removeprefix('head.')} has shape "
                                 f"{tuple(ckpt.head[key].shape)}, expected {tuple(state[key].shape)}")
            state[key] = ckpt.head[key].clone()
    copied: list[str] = []
    if answers is None or "head.3.weight" not in ckpt.head:
        return state, copied
    index = {a: i for i, a in enumerate(answers)}
    for label, answer in enumerate(vocab.label2ans):
        row = index.get(convert_answer(answer))
        if row is None:
            state["head.3.weight"][label] = 0.0
            state["head.3.bias"][label] = 0.0
        else:
            state["head.3.weight"][label] = ckpt.head["head.3.weight"][row]
            state["head.3.bias"][label] = ckpt.head["head.3.bias"][row]
            copied.append(answer)
    return state, copied


def _report(ckpt: Checkpoint, vocab: AnswerVocab, copied: list[str], matched: bool, **sources) -> dict:
    """What went where, for conversion.json: a reader can check no tensor was lost."""
    kept = set(copied)
    dropped = dict(sorted(ckpt.dropped.items()))
    if not matched and "head.3.weight" in ckpt.head:
        dropped.update({f"{HEAD_PREFIX}3.{p}": "no --pretrained-answers: rows cannot be matched to answers"
                        for p in ("weight", "bias")})
    return {**{k: str(v) for k, v in sources.items()}, "encoder_tensors": len(ckpt.encoder),
            "head_tensors_in_checkpoint": sorted(ckpt.head), "answer_rows_copied": len(copied),
            "num_answers": len(vocab), "answers_not_in_release": [a for a in vocab.label2ans if a not in kept],
            "dropped_keys": dropped}


def convert(checkpoint: str | Path, answers: str | Path, out: str | Path,
            pretrained_answers: Optional[str | Path] = None, num_attention_heads: Optional[int] = None,
            seed: int = 0, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Convert; everything is checked before the output folder appears (written whole, then renamed)."""
    check_output(out, folder=True)
    refuse_existing(out, overwrite)
    _require(Path(answers), "answer vocabulary")
    vocab = AnswerVocab.load(answers)
    state = read_checkpoint(checkpoint)
    ckpt = sort_keys(state, str(checkpoint))
    config = infer_config(ckpt, num_attention_heads, state)
    encoder = load_encoder(ckpt, config)
    rows = output_rows(ckpt, config.hidden_size)
    names = release_answers(pretrained_answers, rows) if pretrained_answers is not None else None
    head, copied = build_head(ckpt, config.hidden_size, vocab, names, seed)
    report = _report(ckpt, vocab, copied, names is not None, checkpoint=checkpoint, answers=answers,
                     pretrained_answers=pretrained_answers, seed=seed)
    with atomic_folder(out, overwrite) as tmp:
        encoder.save_pretrained(tmp)
        save_tensors(tmp / HEAD_FILE, head, metadata=head_metadata(vocab.label2ans))
        write_json(tmp / "conversion.json", report)
    log(f"encoder: {len(ckpt.encoder)} tensors -> {out}; dropped {len(ckpt.dropped)} pretraining-head tensors")
    if names is not None:  # the original's own report (load_lxmert_qa)
        log(f"Loaded {len(copied)} answers from LXRTQA pre-training and {len(vocab) - len(copied)} not (their rows "
            f"and biases are zero)")
    else:
        log("answer head: no --pretrained-answers given, the output layer is freshly initialised")
    return report


def _heads(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InputError(f"--num-attention-heads {text}: give a positive number of attention heads")
    return int(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = Parser(prog="python -m lxmert convert", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the release's model_LXRT.pth")
    parser.add_argument("--answers", required=True, help="the project's trainval_ans2label.json")
    parser.add_argument("--pretrained-answers", help="the release's answer list (all_ans.json), one per QA-head row")
    parser.add_argument("--out", required=True, help="output folder (LxmertModel + head.safetensors)")
    parser.add_argument("--num-attention-heads", help="attention heads (default: hidden size / 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised head rows")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    return exit_code(lambda: convert(args.checkpoint, args.answers, args.out, args.pretrained_answers,
                                     _heads(args.num_attention_heads), args.seed, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
