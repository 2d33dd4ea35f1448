"""The VQA model: a transformers encoder (LXMERT or VisualBERT) plus LXMERT's answer head."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..core.config import ModelConfig
from ..core.errors import InputError
from ..core.files import load_tensors, tensor_metadata

log = logging.getLogger(__name__)
HEAD_FILE = "head.safetensors"  # the QA head `python -m lxmert convert` writes beside the encoder


def head_metadata(label2ans: Sequence[str]) -> dict[str, str]:
    """What a QA head file records of the answer vocabulary its rows are ordered by: row i scores
    label2ans[i], so a head only fits data with the same answers in the same order."""
    digest = hashlib.sha256(json.dumps(list(label2ans)).encode()).hexdigest()
    return {"num_answers": str(len(label2ans)), "answers_sha256": digest}


def answer_head(hidden: int, num_answers: int) -> nn.Sequential:
    """LXMERT's VQA head: Linear(h, 2h) - GeLU - LayerNorm - Linear(2h, answers)."""
    head = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=1e-12),
                         nn.Linear(2 * hidden, num_answers))
    for layer in (head[0], head[3]):
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return head


def simple_head(hidden: int, num_answers: int, dropout: float = 0.5) -> nn.Sequential:
    """Si et al.'s classifier (PhoebusSi/Compress-Robust-VQA, hg_transformers/classifier.py lines 5-22 with
    fc.py lines 6-44, put on the pooled output by modeling_lxmert.py lines 233-246): weight-normed Linear(h, 2h)
    (one gain per matrix: dim=None), ReLU, Dropout(0.5), weight-normed Linear(2h, answers). Their init writes
    normal(0, 0.02) into the weight-normed layers' derived `weight`, which has no effect (their lines 206-220):
    the layers keep PyTorch's default init and zero biases, as here."""
    first, last = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, num_answers)
    for layer in (first, last):
        nn.init.zeros_(layer.bias)
    return nn.Sequential(weight_norm(first, dim=None), nn.ReLU(), nn.Dropout(dropout), weight_norm(last, dim=None))


class VQAModel(nn.Module):
    """Encoder + answer head. forward(batch) returns (logits [B, A], pooled output [B, h]). With `sees_image`
    false the model is its own question-only baseline: every region feature and box reaches it as zero."""

    def __init__(self, encoder: nn.Module, family: str, num_answers: int, head: str = "lxmert"):
        super().__init__()
        self.family = family
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = answer_head(hidden, num_answers) if head == "lxmert" else simple_head(hidden, num_answers)
        self.sees_image = True

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.sees_image:
            batch = {**batch, "visual_feats": torch.zeros_like(batch["visual_feats"]),
                     "visual_pos": torch.zeros_like(batch["visual_pos"])}
        if self.family == "lxmert":
            out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               visual_feats=batch["visual_feats"], visual_pos=batch["visual_pos"])
            pooled = out.pooled_output
        else:
            feats = batch["visual_feats"]
            out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               visual_embeds=feats,
                               visual_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device),
                               visual_token_type_ids=torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device))
            pooled = out.pooler_output
        return self.head(pooled), pooled


def _from_pretrained(cls, source: str, **overrides):
    """from_pretrained (of a model or a config) with one clear error when the folder or hub id cannot be loaded."""
    try:
        return cls.from_pretrained(source, **overrides)
    except OSError as e:
        raise InputError(f"cannot load pretrained weights '{source}' (model.pretrained): {str(e).splitlines()[0]} "
                         "- see data/README.md for where to get them; the embedded benchmark's own encoder is "
                         "made by python -m lxmert pretrain --config run/configs/embedded_pretrain.yaml (the embedded studies "
                         "make it first)") from None


def pretrained_config(cfg: ModelConfig):
    """The transformers config of the pretrained encoder (read without its weights), None without one."""
    from transformers import LxmertConfig, VisualBertConfig

    if not cfg.pretrained:
        return None
    return _from_pretrained(LxmertConfig if cfg.family == "lxmert" else VisualBertConfig, cfg.pretrained)


def feature_dim(config) -> int:
    """The region-feature size a transformers LXMERT or VisualBERT config expects."""
    return config.visual_feat_dim if hasattr(config, "visual_feat_dim") else config.visual_embedding_dim


def check_inputs(cfg: ModelConfig, largest_token: int, feat_dim: int, max_seq_length: int) -> None:
    """Refuse data the pretrained encoder cannot read, before any work: token ids beyond its vocabulary (a
    tokenizer larger than the model's), more positions than it has, region features of another size."""
    config = pretrained_config(cfg)
    if config is None:
        return
    if largest_token >= config.vocab_size:
        raise InputError(f"the tokenizer gives token id {largest_token}, but the pretrained model '{cfg.pretrained}' "
                         f"(model.pretrained) has a vocabulary of {config.vocab_size}: use the tokenizer it was "
                         "pretrained with (model.tokenizer)")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_seq_length > positions:
        raise InputError(f"data.max_seq_length {max_seq_length} exceeds the {positions} positions of the pretrained "
                         f"model '{cfg.pretrained}'")
    if feature_dim(config) != feat_dim:
        raise InputError(f"pretrained model {cfg.pretrained} expects {feature_dim(config)}-d region features, "
                         f"the feature store has {feat_dim}")


def _encoder(cfg: ModelConfig, vocab_size: int, feat_dim: int) -> nn.Module:
    """transformers' LxmertModel or VisualBertModel: pretrained weights when configured (with the
    config's dropout), else randomly initialised at the configured size."""
    from transformers import LxmertModel, VisualBertModel

    name, cls = ("LXMERT", LxmertModel) if cfg.family == "lxmert" else ("VisualBERT", VisualBertModel)
    dropout = {"hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout}
    if cfg.pretrained:
        encoder = _from_pretrained(cls, cfg.pretrained, **dropout)
        log.info("loaded pretrained %s encoder from %s", name, cfg.pretrained)
        return encoder
    if name not in _SAID_RANDOM:  # once per process: a study builds many models
        _SAID_RANDOM.add(name)
        log.info("no pretrained weights configured (model.pretrained is null): %s encoder randomly initialised", name)
    return cls(encoder_config(cfg, vocab_size, feat_dim))


def encoder_config(cfg: ModelConfig, vocab_size: int, feat_dim: int):
    """The transformers config of the encoder the model keys describe (model.pretrained null: its size and
    dropout; pretrained weights bring their own, pretrained_config)."""
    from transformers import LxmertConfig, VisualBertConfig

    sizes = {"vocab_size": vocab_size, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
             "intermediate_size": cfg.intermediate_size, "hidden_dropout_prob": cfg.dropout,
             "attention_probs_dropout_prob": cfg.dropout}
    if cfg.family == "lxmert":
        return LxmertConfig(l_layers=cfg.l_layers, x_layers=cfg.x_layers, r_layers=cfg.r_layers,
                            visual_feat_dim=feat_dim, visual_pos_dim=4, **sizes)
    return VisualBertConfig(num_hidden_layers=cfg.num_hidden_layers, visual_embedding_dim=feat_dim, **sizes)


def model_from_config(family: str, encoder_config: dict, num_answers: int, head: str) -> VQAModel:
    """An untrained model with an encoder of this transformers config (a dict, as config.json holds it): the
    skeleton a saved state loads into."""
    from transformers import LxmertConfig, LxmertModel, VisualBertConfig, VisualBertModel

    cfg_cls, cls = (LxmertConfig, LxmertModel) if family == "lxmert" else (VisualBertConfig, VisualBertModel)
    return VQAModel(cls(cfg_cls.from_dict(encoder_config)), family, num_answers, head)


_SAID_RANDOM: set[str] = set()
_SAID_NO_HEAD: set[str] = set()
_SAID_UNCHECKED: set[str] = set()  # heads without an answer digest, warned about once per process


def build_model(cfg: ModelConfig, vocab_size: int, feat_dim: int, num_answers: int,
                answers: Optional[Sequence[str]] = None) -> VQAModel:
    """Build the model; call under a seeded RNG so initialisation is reproducible. `answers` (label2ans of
    the data) lets a pretrained QA head be checked against the answer order it was built for."""
    model = VQAModel(_encoder(cfg, vocab_size, feat_dim), cfg.family, num_answers, cfg.head)
    if cfg.pretrained and feature_dim(model.encoder.config) != feat_dim:
        raise InputError(f"pretrained model {cfg.pretrained} expects {feature_dim(model.encoder.config)}-d "
                         f"region features, the feature store has {feat_dim}")
    if cfg.pretrained and cfg.head == "lxmert":  # Si et al.'s classifier starts fresh on the pretrained encoder
        _load_pretrained_head(model, Path(cfg.pretrained) / HEAD_FILE, answers)
    if cfg.answer_prior is not None:
        shift_answer_biases(model, cfg.answer_prior)
    return model


def shift_answer_biases(model: VQAModel, prior: float) -> None:
    """Shift every output bias of the answer head by log(prior / (1 - prior)). LXMERT pretrains its QA head with
    a softmax cross-entropy (airsplay/lxmert src/lxrt/modeling.py lines 938 and 977-980) and fine-tunes it
    with a sigmoid BCE (src/tasks/vqa.py lines 63 and 95-96), so a copied head, like a freshly initialised
    one, starts the fine-tune with logits near 0: every answer at probability ~0.5. The first steps'
    gradients (all answers but a few pushed down) then overwrite what the encoder brought (on the embedded
    benchmark, the stand-in's existence skill within the first epoch: README). RetinaNet sets a fresh
    sigmoid classifier's biases to this value, with prior 0.01 (facebookresearch/Detectron
    detectron/modeling/retinanet_heads.py lines 55-58, detectron/core/config.py line 547); a shift is the
    same for a fresh head and keeps a loaded head's order of answers."""
    with torch.no_grad():
        model.head[-1].bias += math.log(prior / (1 - prior))


def _load_pretrained_head(model: VQAModel, path: Path, answers: Optional[Sequence[str]] = None) -> None:
    """A pretrained folder written by `python -m lxmert convert` holds the QA head initialised from the release's
    head by answer string (study A's starting point, hence its rewind point); load it when present."""
    if not path.is_file():
        hub_id = not path.parent.is_dir()
        if model.family == "lxmert" and hub_id and str(path.parent) not in _SAID_NO_HEAD:
            _SAID_NO_HEAD.add(str(path.parent))
            log.warning("the QA head starts random: hub weights %s carry no QA head for these answers. The original "
                        "study rewinds to LXMERT's pretrained QA head (rows copied by answer string); convert the "
                        "release model_LXRT.pth with python -m lxmert convert and set model.pretrained to its "
                        "output for that rewind point (data/README.md)", path.parent)
        return
    if answers is not None:
        _check_head_answers(path, answers)
    state = {k.removeprefix("head."): v for k, v in load_tensors(path).items()}
    own = model.head.state_dict()
    wrong = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    if set(state) != set(own) or wrong:
        raise InputError(f"{path}: QA head does not fit this model (keys {sorted(state)} vs {sorted(own)}, "
                         f"shapes file vs model {wrong}); was it converted with this answer vocabulary?")
    model.head.load_state_dict(state)
    log.info("loaded the pretrained QA head from %s", path)


def _check_head_answers(path: Path, answers: Sequence[str]) -> None:
    """Refuse a head whose rows follow another answer vocabulary: with as many answers it would load and
    silently score every answer with another answer's row. Heads written before the digest was recorded
    cannot be checked (a warning says so)."""
    metadata = tensor_metadata(path)
    if metadata is None:  # missing or unreadable: load_tensors gives the clear error
        return
    recorded = metadata.get("answers_sha256")
    if recorded is None:
        if str(path) in _SAID_UNCHECKED:
            return
        _SAID_UNCHECKED.add(str(path))
        log.warning("%s records no answer vocabulary: it cannot be checked against the data's; make it again "
                    "(python -m lxmert convert, or remove a stand-in encoder folder) to have it checked", path)
    elif recorded != head_metadata(answers)["answers_sha256"]:
        raise InputError(f"{path}: QA head built for another answer vocabulary (other answers or another order) "
                         f"than the data's {len(answers)} answers; make it again with this data's "
                         f"trainval_ans2label.json (python -m lxmert convert, or remove the stand-in encoder folder)")
