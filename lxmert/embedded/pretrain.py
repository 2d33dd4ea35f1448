"""The embedded benchmark's stand-in for LXMERT's released pretrained weights.

LXMERT was pretrained on other images and other tasks than the VQA fine-tune it is used for: masked
language modelling on captions, masked object prediction (detector labels, attributes, features) and
image-text matching. The stand-in does the same with transformers' own `LxmertForPreTraining`, on the
benchmark's `pretrain` images (captions list their objects from left to right; lxmert/embedded/generator.py),
which no study question is asked about and which no study split shares:
  - masked LM: `token_mask` of the caption tokens (80 % [MASK], 10 % a random word, 10 % kept) are
    predicted, on matched captions only (as LXMERT);
  - masked objects: `region_mask` of the regions get the mean region feature instead of their own (zeros,
    as in LXMERT, would feed its visual LayerNorm (eps 1e-12) a zero-variance input at initialisation,
    with gradients ~10^4 times those of the other tasks); their shape (obj), colour x size (attr) and
    features (feat) are predicted;
  - image-text matching: half of the captions are replaced, by another image's caption or by this image's
    caption with one colour or shape word changed (a hard negative that needs grounding).
  - question answering (which colour / shape / size has the object named by one attribute, does the picture
    show a shape, how many things are in the picture), as LXMERT pretrained on image QA of other datasets
    and of VQA's train split: four of these families are study templates in the studies' words, asked here
    on other images with uniform answers; the studies' other six families are never asked here.
Every example is an (image, text) pair: an image's caption (matched or not) or one of its questions
(matched, with its answer); masked LM applies to captions only (questions stay whole; see make_batch). `held_out` of the images are only evaluated (masked-LM, masked-object
and matching accuracy, logged per epoch); nothing is selected: the last epoch is exported.

The encoder (LxmertModel.save_pretrained), the tokenizer and the study's QA head go to `pretrain.export`
(the head as LXMERT's fine-tuning builds it from the release's QA head: rows copied by answer, zero for the
rest; `qa_head`)
(models/embedded_pretrain/encoder, outside the data folder), with pretrain.json recording the settings it
was made with and its per-epoch metrics. The embedded configs read it as model.pretrained;
`ensure_pretrained` makes it once (under a lock, so cooperating processes make it once) and refuses one
made with other settings. A killed pretraining resumes from its last finished epoch (checkpoints in
<export>.run/, removed once the export is published) to the same weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import LxmertConfig, LxmertForPreTraining, get_linear_schedule_with_warmup

from ..core.config import Config
from ..core.errors import InputError
from ..core.files import atomic_folder, load_state, read_json, remove_temporaries, remove_tree, \
    save_state, save_tensors, write_json
from ..core.locks import FileLock
from ..core.logs import setup_logging
from ..core.paths import SETTINGS, Run
from ..core.settings import plain, setting_changes, unit_settings
from ..data.answers import AnswerVocab
from ..data.features import FeatureStore
from ..data.tokenizer import load_tokenizer
from ..modeling.convert import HEAD_LAYERS, HEAD_PREFIX, Checkpoint, build_head
from ..modeling.vqa import HEAD_FILE, head_metadata
from ..train.checkpoints import check_digests, digests
from ..train.optimizers import adamw
from .generator import (
    COLORS,
    FORMAT_VERSION,
    PRETRAIN_ANSWERS,
    PRETRAIN_ATTRIBUTES,
    PRETRAIN_OBJECTS,
    PRETRAIN_SPLIT,
    SHAPES,
    prepare_embedded,
)

log = logging.getLogger("lxmert")

CAPTION_TOKENS = 40
COLOR_WORDS = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
SHAPE_WORDS = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
RECORD = "pretrain.json"


def settings(cfg: Config) -> dict:
    """What the stand-in depends on: the benchmark (its settings and the generator's format version, which
    changes with what the generator writes), the encoder's sizes and the pretraining schedule."""
    keys = ["data.embedded", "model.family", "model.hidden_size", "model.num_attention_heads",
            "model.intermediate_size", "model.l_layers", "model.x_layers", "model.r_layers", "pretrain"]
    settings = unit_settings(cfg, keys)
    settings.pop("pretrain.export", None)
    settings["data.embedded.format_version"] = FORMAT_VERSION
    return plain(settings)


def reads_standin(cfg: Config) -> bool:
    """Whether the config fine-tunes the embedded benchmark's stand-in encoder."""
    return cfg.data.dataset == "embedded" and bool(cfg.model.pretrained) and \
        Path(cfg.model.pretrained) == Path(cfg.pretrain.export)


def ensure_pretrained(cfg: Config) -> None:
    """Make the stand-in encoder when the config reads it and it is missing (once, under a lock), and
    refuse one that was made with other settings (it would silently give other numbers)."""
    if not reads_standin(cfg):
        return
    export = Path(cfg.pretrain.export)
    with FileLock(export.parent / f".{export.name}.lock"):
        if (export / RECORD).exists():
            check_recorded(cfg, export)
            _drop_checkpoints(export)
            return
        for path in remove_temporaries(export.parent, of=export.name):
            log.info("removed %s, left by an interrupted pretraining", path)
        log.info("making the stand-in pretrained encoder %s (python -m lxmert pretrain; done once)", export)
        _pretrain(cfg)


def check_recorded(cfg: Config, export: Path) -> None:
    recorded = read_json(export / RECORD, "stand-in pretraining record").get("settings", {})
    changed = setting_changes(recorded, settings(cfg), shown=3)
    if changed:
        raise InputError(f"{export / RECORD}: the stand-in encoder was pretrained with other settings ({changed}); "
                         f"remove {export} to make it again, or set pretrain.export and model.pretrained to another "
                         "folder")


def _drop_checkpoints(export: Path) -> None:
    """The checkpoints of a pretraining whose export was published (a kill came between the two), and what a
    kill while removing them left."""
    run = _run(export).folder
    remove_tree(run)
    remove_temporaries(run.parent, of=run.name)


def _run(export: Path) -> Run:
    return Run(export.parent / f"{export.name}.run")


def run_pretrain(cfg: Config) -> Path:
    """The `pretrain` command: make the stand-in encoder of the config (refuses an existing one made with
    other settings; an existing one made with these settings is kept)."""
    setup_logging(cfg)
    export = Path(cfg.pretrain.export)
    with FileLock(export.parent / f".{export.name}.lock"):
        if (export / RECORD).exists():
            check_recorded(cfg, export)
            _drop_checkpoints(export)
            log.info("%s is already there, made with these settings", export)
            return export
        for path in remove_temporaries(export.parent, of=export.name):
            log.info("removed %s, left by an interrupted pretraining", path)
        return _pretrain(cfg)


class PretrainData:
    """Captions, regions and region labels of the pretraining images, in memory (a few MB)."""

    def __init__(self, cfg: Config):
        root = Path(cfg.data.root)
        self.tokenizer = load_tokenizer(cfg)
        self.store = FeatureStore(root / cfg.data.features)
        records = read_json(root / f"{PRETRAIN_SPLIT}.json", "pretraining records")
        self.captions = [r["caption"] for r in records]
        answer_index = {a: i for i, a in enumerate(PRETRAIN_ANSWERS)}
        self.questions = [[q["sent"] for q in r.get("questions", [])] for r in records]
        self.answers = [[answer_index[q["answer"]] for q in r.get("questions", [])] for r in records]
        rows = np.array([self.store.row(r["img_id"]) for r in records])
        self.obj = torch.tensor([r["obj"] for r in records])
        self.attr = torch.tensor([r["attr"] for r in records])
        self.feats = torch.from_numpy(np.asarray(self.store._features[rows], np.float32))
        self.boxes = torch.from_numpy(np.asarray(self.store._boxes[rows], np.float32))
        self.mean_feature = self.feats.mean((0, 1))
        self.special = torch.tensor(self.tokenizer.all_special_ids)

    def __len__(self) -> int:
        return len(self.captions)


def _negative(data: PretrainData, index: int, rng: np.random.Generator) -> str:
    """A caption that does not match the image: another image's, or this one with a colour or shape swapped."""
    caption = data.captions[index]
    if rng.random() < 0.5:
        other = int(rng.integers(len(data) - 1))
        return data.captions[other + (other >= index)]
    words, names = (COLOR_WORDS, COLORS) if rng.random() < 0.5 else (SHAPE_WORDS, SHAPES)
    hits = list(words.finditer(caption))
    hit = hits[int(rng.integers(len(hits)))]
    new = names[(names.index(hit.group(0)) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
    return caption[:hit.start()] + new + caption[hit.end():]


def make_batch(data: PretrainData, examples: list[tuple[int, int]], rng: np.random.Generator, token_mask: float,
               region_mask: float) -> dict:
    """Inputs and labels of the tasks for (image, text) examples, every random choice drawn from `rng`: text
    -1 is the image's caption (replaced by a non-matching one half of the time), text k its k-th question."""
    index = np.array([i for i, _ in examples])
    texts, matched, answers = [], [], []
    for i, k in examples:
        if k < 0:
            match = bool(rng.random() < 0.5)
            texts.append(data.captions[i] if match else _negative(data, i, rng))
        else:
            match = True
            texts.append(data.questions[i][k])
        matched.append(match)
        answers.append(data.answers[i][k] if k >= 0 else -100)
    enc = data.tokenizer(texts, padding=True, truncation=True, max_length=CAPTION_TOKENS, return_tensors="pt")
    ids = enc["input_ids"].clone()
    # Caption tokens are masked whether the caption matches or not (masking only matched ones would give the
    # matching task away); only those of matched captions are predicted, as in LXMERT. Questions stay whole:
    # a masked shape or colour word leaves a question unanswerable, and the 5-7-word questions lost their key
    # word often enough to cost the stand-in's held-out QA 20 points after 24 epochs (55 % masked, 75 % whole).
    caption = torch.tensor([k < 0 for _, k in examples])
    chosen = ~torch.isin(ids, data.special) & torch.from_numpy(rng.random(ids.shape) < token_mask) & caption[:, None]
    labels = torch.where(chosen & torch.tensor(matched)[:, None], ids, torch.full_like(ids, -100))
    roll = torch.from_numpy(rng.random(ids.shape))
    swap = torch.from_numpy(rng.integers(len(data.special), len(data.tokenizer), ids.shape))
    ids = torch.where(chosen & (roll < 0.8), data.tokenizer.mask_token_id, ids)
    ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), swap, ids)
    feats = data.feats[index].clone()
    masked = torch.from_numpy(rng.random(feats.shape[:2]) < region_mask)
    target = feats.clone()
    feats[masked] = data.mean_feature
    weight = masked.float()
    answers = torch.tensor(answers)
    # A loss over no target at all is NaN: leave out the labels of a task with none in this batch.
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "visual_feats": feats,
            "visual_pos": data.boxes[index], "labels": labels if bool((labels != -100).any()) else None,
            "matched_label": torch.tensor(matched).long(), "ans": answers if bool((answers >= 0).any()) else None,
            "obj_labels": {"obj": (data.obj[index], weight), "attr": (data.attr[index], weight),
                           "feat": (target, weight)}}


def epoch_examples(data: PretrainData, images: np.ndarray, epoch: int, rng: np.random.Generator
                   ) -> list[tuple[int, int]]:
    """One epoch: every question of every image and each image's caption once, shuffled."""
    examples = [(int(i), -1) for i in images]
    examples += [(int(i), k) for i in images for k in range(len(data.questions[i]))]
    return [examples[j] for j in rng.permutation(len(examples))]


def build_model(cfg: Config, data: PretrainData):
    """transformers' LxmertForPreTraining at the config's sizes, with the three tasks' heads."""
    m = cfg.model
    config = LxmertConfig(vocab_size=len(data.tokenizer), hidden_size=m.hidden_size,
                          num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
                          l_layers=m.l_layers, x_layers=m.x_layers, r_layers=m.r_layers,
                          hidden_dropout_prob=cfg.pretrain.dropout, attention_probs_dropout_prob=cfg.pretrain.dropout,
                          visual_feat_dim=data.store.feat_dim, visual_pos_dim=4,
                          num_object_labels=PRETRAIN_OBJECTS, num_attr_labels=PRETRAIN_ATTRIBUTES,
                          num_qa_labels=len(PRETRAIN_ANSWERS), task_mask_lm=True, task_obj_predict=True, task_matched=True,
                          task_qa=any(data.questions),
                          visual_obj_loss=True, visual_attr_loss=True, visual_feat_loss=True,
                          initializer_range=cfg.pretrain.init_std)
    return LxmertForPreTraining(config)


@torch.no_grad()
def held_out_metrics(model, data: PretrainData, images: np.ndarray, token_mask: float, region_mask: float) -> dict:
    """Masked-LM, masked-object (shape and colour x size), matching and question-answering accuracy on
    held-out images, with a fixed draw of masks and negatives."""
    was_training = model.training
    model.eval()
    examples = [(int(i), -1) for i in images] + [(int(i), 0) for i in images if data.questions[i]]
    batch = make_batch(data, examples, np.random.default_rng(12345), token_mask, region_mask)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "visual_feats", "visual_pos")}
    out = model.lxmert(**inputs)
    words, matching = model.cls(out.language_output, out.pooled_output)
    visual = model.obj_predict_head(out.vision_output)
    model.train(was_training)
    captions = torch.tensor([k < 0 for _, k in examples])
    masked = batch["labels"] != -100 if batch["labels"] is not None else torch.zeros_like(batch["input_ids"]).bool()
    region = batch["obj_labels"]["obj"][1].bool()

    def pct(hits: torch.Tensor) -> float:
        return round(100 * float(hits.float().mean()), 2) if hits.numel() else 0.0
    metrics = {"masked_lm": pct(words.argmax(-1)[masked] == batch["labels"][masked]) if masked.any() else 0.0,
               "masked_object": pct(visual["obj"].argmax(-1)[region] == batch["obj_labels"]["obj"][0][region]),
               "masked_attribute": pct(visual["attr"].argmax(-1)[region] == batch["obj_labels"]["attr"][0][region]),
               "matching": pct((matching.argmax(-1) == batch["matched_label"])[captions])}
    if batch["ans"] is not None:
        qa = model.answer_head(out.pooled_output).argmax(-1)
        metrics["qa"] = pct((qa == batch["ans"])[~captions])
    return metrics


def _pretrain(cfg: Config) -> Path:
    """Pretrain the stand-in and export its encoder (see the module docstring). Every epoch but the last ends
    with a checkpoint in <export>.run/ (model, optimizer, scheduler, both RNG states, history), so a killed
    pretraining resumes at its last finished epoch and ends with the same weights; the folder goes once the
    export is published."""
    if cfg.data.dataset != "embedded" or cfg.model.family != "lxmert":
        raise InputError("the stand-in pretraining is for the embedded benchmark with model.family=lxmert "
                         f"(this config has data.dataset={cfg.data.dataset}, model.family={cfg.model.family})")
    export = Path(cfg.pretrain.export)
    if export.exists() and (not export.is_dir() or any(export.iterdir())):
        raise InputError(f"pretrain.export {export} exists and holds no stand-in encoder ({RECORD} is missing); "
                         "nothing is replaced: remove it or set pretrain.export (and model.pretrained) elsewhere")
    prepare_embedded(cfg, log.info)
    pc, started = cfg.pretrain, time.time()
    data = PretrainData(cfg)
    order = np.random.default_rng([pc.seed, 0]).permutation(len(data))
    held = np.sort(order[: int(pc.held_out * len(data))])
    train = order[len(held):]
    run = _run(export)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(pc.seed)
        model = build_model(cfg, data)
        per_epoch = len(train) + sum(len(data.questions[i]) for i in train)
        steps = math.ceil(per_epoch / pc.batch_size) * pc.epochs
        optimizer = adamw(model.parameters(), pc.lr, torch.device("cpu"))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(pc.warmup * steps), steps)
        rng = np.random.default_rng([pc.seed, 1])
        state = _Progress(run, settings(cfg), model, optimizer, scheduler, rng)
        for epoch in range(state.resume(), pc.epochs):
            losses = []
            examples = epoch_examples(data, train, epoch, rng)
            for start in range(0, len(examples), pc.batch_size):
                batch = make_batch(data, examples[start:start + pc.batch_size], rng, pc.token_mask, pc.region_mask)
                loss = model(**batch, return_dict=True).loss
                loss.backward()
                if pc.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), pc.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            metrics = held_out_metrics(model, data, held, pc.token_mask, pc.region_mask) if len(held) else {}
            state.history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4), **metrics})
            log.info("stand-in pretraining | epoch %d/%d | loss %.4f | held out: %s", epoch + 1, pc.epochs,
                     state.history[-1]["loss"], ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
            if epoch + 1 < pc.epochs:
                state.save(epoch + 1, time.time() - started)
    head, copied, answers = qa_head(cfg, model)
    with atomic_folder(export, overwrite=True) as tmp:
        model.lxmert.save_pretrained(str(tmp))
        data.tokenizer.save_pretrained(str(tmp))
        save_tensors(tmp / HEAD_FILE, head, metadata=head_metadata(answers))
        write_json(tmp / RECORD, {"settings": settings(cfg), "history": state.history,
                                  "images": {"train": len(train), "held_out": len(held)},
                                  "qa_head_answers_copied": copied,
                                  "seconds": round(state.seconds + time.time() - started, 1)})
    remove_tree(run.folder)
    log.info("exported the stand-in encoder to %s (%.0f s)", export, state.seconds + time.time() - started)
    return export


class _Progress:
    """The pretraining's checkpoints in a run folder: the state after each finished epoch, published whole
    (core.files.atomic_folder), older ones removed; settings.json says what they were made with."""

    def __init__(self, run: Run, settings: dict, model, optimizer, scheduler, rng: np.random.Generator):
        self.run, self.settings = run, settings
        self.model, self.optimizer, self.scheduler, self.rng = model, optimizer, scheduler, rng
        self.history: list[dict] = []
        self.seconds = 0.0  # spent before the last resume

    def resume(self) -> int:
        """The epoch to start at: after the newest checkpoint (its state restored), else 0."""
        folder = self.run.folder
        for path in remove_temporaries(folder) if folder.exists() else []:
            log.info("removed %s, left by an interrupted pretraining", path)
        found = self.run.checkpoints()
        if (folder / SETTINGS).exists():
            recorded = read_json(folder / SETTINGS, "stand-in pretraining checkpoint settings")
            changed = setting_changes(recorded if isinstance(recorded, dict) else {}, self.settings, shown=3)
            if changed:
                raise InputError(f"{folder}: checkpoints of a stand-in pretraining with other settings ({changed}); "
                                 f"remove {folder} to start this one")
        elif found:
            raise InputError(f"{folder}: checkpoints without their {SETTINGS}; remove {folder} to start again")
        if not found:
            write_json(folder / SETTINGS, self.settings)
            return 0
        newest = found[-1]
        check_digests(newest)
        state = load_state(newest / "trainer.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])
        self.history, self.seconds = list(state["history"]), float(state["seconds"])
        for old in found[:-1]:
            remove_tree(old)
        log.info("stand-in pretraining: resumed from %s at epoch %d", newest, state["epoch"] + 1)
        return int(state["epoch"])

    def save(self, epoch: int, seconds: float) -> None:
        with atomic_folder(self.run.checkpoint(epoch, epoch, 0), overwrite=True) as tmp:
            # torch.save, not safetensors: the masked-LM decoder shares the word embeddings' storage
            save_state(tmp / "trainer.pt", {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(self.rng.bit_generator.state),
                "history": self.history, "epoch": epoch, "seconds": self.seconds + seconds})
            write_json(tmp / "manifest.json", {"step": epoch, "files": digests(tmp)})
        for old in self.run.checkpoints()[:-1]:
            remove_tree(old)


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread inside, the caller's count restored after. CPU sums are ordered by the thread
    count and training carries such float differences on, so without it the `pretrain` command (all cores)
    and a study (cores / workers) made different stand-ins that record the same settings
    (tests/test_pretrain.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def qa_head(cfg: Config, model) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The study's QA head as the original fine-tuning builds it from the release (load_lxmert_qa;
    lxmert/modeling/convert.py build_head): hidden layers from the pretraining QA head, each study answer's output row
    and bias copied from the pretraining row of the same answer, zero for answers pretraining never gave.
    Returns the head, the answers copied and the study's answers in row order (label2ans)."""
    vocab = AnswerVocab.load(Path(cfg.data.root) / cfg.data.ans2label)
    ckpt = Checkpoint()
    for key, tensor in model.state_dict().items():
        if key.startswith(HEAD_PREFIX):
            layer, name = key.removeprefix(HEAD_PREFIX).split(".")
            if layer in HEAD_LAYERS:
                ckpt.head[f"{HEAD_LAYERS[layer]}.{name}"] = tensor.detach().clone()
    head, copied = build_head(ckpt, cfg.model.hidden_size, vocab, list(PRETRAIN_ANSWERS), cfg.pretrain.seed)
    log.info("QA head: %d of %d study answers copied from the pretraining QA head, the others start at zero",
             len(copied), len(vocab))
    return head, copied, vocab.label2ans


def record(cfg: Config) -> Optional[dict]:
    """The stand-in's pretraining record (settings, per-epoch metrics, time), if it was made."""
    path = Path(cfg.pretrain.export) / RECORD
    return read_json(path, "stand-in pretraining record") if path.exists() else None
