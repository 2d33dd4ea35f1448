"""Experiment configuration: typed dataclasses loaded from YAML, with command-line overrides.

Every field carries its own help text and, where it matters, a range check, so a wrong value
stops the run before anything is written, with an error that names the key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .errors import ConfigError


def _f(default: Any, help: str, check: Optional[Callable[[Any], bool]] = None, rule: str = "") -> Any:
    """A dataclass field with help text and an optional validity check."""
    meta = {"help": help, "check": check, "rule": rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v: Any) -> bool:
    return v > 0


def _upto(limit: int) -> Callable[[Any], bool]:
    """A positive count no larger than `limit` (sizes beyond it would only fail later, in a kernel)."""
    return lambda v: 0 < v <= limit


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0.0 <= v < 1.0


def _all_fractions(v: Any) -> bool:
    return all(0.0 <= x < 1.0 for x in v)


def _names(v: Any, allow_empty: bool = True) -> bool:
    return (allow_empty or len(v) > 0) and all(isinstance(x, str) and x for x in v)


def _name(v: Any) -> bool:
    """A name that is not a path: letters, digits, '_', '-', '.', not starting with '.' (split and experiment
    names become file and folder names)."""
    return isinstance(v, str) and EXPERIMENT_NAME.fullmatch(v) is not None


def _split_names(v: Any, allow_empty: bool = True) -> bool:
    return (allow_empty or len(v) > 0) and all(_name(x) for x in v)


# Default prunable set of study A (LXMERT): every Linear weight of the encoders (language, vision with the
# visual feature and box projections, cross-modality) and of the pooler; not the embeddings, not the QA head.
PRUNABLE_DEFAULT = ("encoder.encoder.*", "encoder.pooler.*")
# Study B's masked set (Si et al.): the word embeddings and every Linear weight of the language, vision
# (visual feature and box projections included) and cross-modality layers and of the pooler.
STUDY_B_PRUNABLE = ("encoder.embeddings.word_embeddings.weight", "encoder.encoder.*", "encoder.pooler.*")
# Keys renamed since an earlier version: old dotted name -> new one (records made before read the old name as
# the new one; a config that still uses the old name is told the new one).
RENAMED_KEYS = {"blind_epochs": "blind.epochs"}
# Keys removed, with what replaces them.
REMOVED_KEYS = {"model.export": "export a finished unit with python -m lxmert export --config CONFIG --unit UNIT "
                                "--out FOLDER"}
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits, '_', '-', '.' not starting with '.' (not a path)"
# Split names that are test splits (never used for model selection): the embedded test / cp_test,
# VQA v2's test, VQA-CP's cp_test, VQA-VS's test_iid and ood_* sets.
TEST_SPLIT = re.compile(r"test|^ood_")
MAX_SEED = 2**31 - 1
PRUNING_MODES = ("low_magnitude", "random", "high_magnitude", "original_high")
STRUCTURES = ("weights", "heads", "neurons", "n_m")  # lottery.granularity (prune/structure.py)


def level_name(level: float) -> str:
    """The folder of a pruning level: level_<percent, 2 decimals>."""
    return f"level_{round(100 * level, 2):g}"


@dataclass
class EmbeddedConfig:
    """Parameters of the synthetic benchmark the project generates itself (lxmert/embedded/generator.py)."""

    seed: int = _f(1234, "seed of the generator; the same seed writes byte-identical files")
    train_questions: int = _f(3000, "study A training questions (natural answer priors)", _upto(10**7), "in [1, 1e7]")
    valid_questions: int = _f(600, "study A validation questions (minival; natural priors)", _upto(10**7), "in [1, 1e7]")
    test_questions: int = _f(1000, "study A test questions (natural priors; also study B's natural-prior test, "
                             "like VQA v2 val beside VQA-CP v2)", _upto(10**7), "in [1, 1e7]")
    cp_train_questions: int = _f(3000, "study B training questions (changing priors: the training side)",
                                 _upto(10**7), "in [1, 1e7]")
    cp_valid_questions: int = _f(600, "study B validation questions (training side; model selection)",
                                 _upto(10**7), "in [1, 1e7]")
    cp_test_iid_questions: int = _f(1000, "study B in-distribution test questions (training side)", _upto(10**7), "in [1, 1e7]")
    cp_test_questions: int = _f(1000, "study B shifted test questions (the test side of every question type)",
                                _upto(10**7), "in [1, 1e7]")
    pretrain_images: int = _f(3000, "captioned images with region labels for the stand-in pretraining (their own "
                              "images: no study question is asked on them)", _upto(10**7), "in [1, 1e7]")
    questions_per_image: int = _f(3, "questions asked about each study image", _upto(100), "in [1, 100]")
    pretrain_questions_per_image: int = _f(3, "questions of the pretraining families per pretraining image "
                                           "(0: no question answering in pretraining)", _non_negative, ">= 0")
    pretrain_min_objects: int = _f(1, "fewest objects in a pretraining scene", _upto(100), "in [1, 100]")
    pretrain_max_objects: int = _f(4, "most objects in a pretraining scene (pretraining images are simpler than the "
                                   "studies': a tiny LXMERT learns to ground words in regions within a few thousand "
                                   "steps on 1-3 objects, not on 3-6)", _upto(100), "in [1, 100]")
    num_regions: int = _f(8, "regions per image (objects + background), like detector boxes", _upto(1000), "in [1, 1,000]")
    feat_dim: int = _f(64, "dimension D of each region feature", _upto(65536), "in [1, 65,536]")
    min_objects: int = _f(2, "fewest objects in a scene", _upto(100), "in [1, 100]")
    max_objects: int = _f(5, "most objects in a scene", _upto(100), "in [1, 100]")
    feature_noise: float = _f(0.5, "std of the Gaussian noise added to every region feature", _non_negative, ">= 0")
    hard_questions: float = _f(0.25, "share of questions whose objects are partly hidden (their region features "
                               "keep only part of the object's signal); annotators disagree more on them",
                               lambda v: 0 <= v <= 1, "in [0, 1]")
    hidden_visibility: float = _f(0.15, "signal left in a hidden object's region: drawn in [v/2, v]",
                                  lambda v: 0 < v <= 1, "in (0, 1]")
    annotator_accuracy: float = _f(0.95, "probability that a simulated annotator gives the true answer when the "
                                   "question's objects are fully visible", lambda v: 0 < v <= 1, "in (0, 1]")
    hard_accuracy: float = _f(0.4, "the same when they are hidden (linear in between)", lambda v: 0 < v <= 1,
                              "in (0, 1]")
    prior_exponent: float = _f(0.8, "Zipf exponent of the natural answer prior of each question type (seeded "
                               "order of its answers)", _non_negative, ">= 0")
    cp_test_share: float = _f(0.4, "changing priors (VQA-CP v2): each question type's (type, answer) groups are "
                              "assigned greedily, in a seeded order, to the test side until it holds about this "
                              "share of the type's natural mass; the rest form the training side",
                              lambda v: 0 < v < 1, "in (0, 1)")
    cp_skew: float = _f(0.8, "share of a (type, answer) group's questions that go to its own side; the rest go to "
                        "the other side (so every answer of a type occurs in both, at low frequency on one)",
                        lambda v: 0.5 <= v < 1, "in [0.5, 1)")


@dataclass
class DataConfig:
    dataset: str = _f("embedded", "'embedded' (generated on first use) or 'prepared' (question JSON + "
                      "feature store made by the data/ scripts)", lambda v: v in ("embedded", "prepared"),
                      "one of embedded, prepared")
    root: str = _f("data/embedded", "folder with the question JSON files, answer vocab and feature store")
    features: str = _f("features", "feature store folder, relative to root unless absolute")
    train: list = _f(["train"], "question files (names without .json in root) used for training",
                     lambda v: _split_names(v, allow_empty=False), f"a non-empty list of split names ({NAME_RULE})")
    valid: str = _f("minival", "question file used for model selection (never a test split)",
                    lambda v: _name(v) and not TEST_SPLIT.search(v),
                    f"a split name that is not a test split (no 'test' in it, not ood_*; {NAME_RULE})")
    test: list = _f(["test"], "question files evaluated with the selected model", _split_names,
                    f"a list of split names ({NAME_RULE})")
    ans2label: str = _f("trainval_ans2label.json", "answer vocabulary file in root")
    max_seq_length: int = _f(20, "question tokens, [CLS] and [SEP] included", lambda v: 3 <= v <= 512,
                             "in [3, 512] ([CLS], one word, [SEP]; BERT's 512 positions)")
    special_tokens: bool = _f(True, "add [CLS] and [SEP] to each question (Si et al.'s loader does not: "
                              "dataset_LXM.py lines 189-226 tokenizes with _tokenize, so the pooler reads the first "
                              "word)")
    mask_padding: bool = _f(True, "give the model an attention mask over the padding (Si et al.'s trainer passes "
                            "none: mask_trainer_VQA.py line 789; every [PAD] of the max_seq_length tokens is "
                            "attended)")
    num_workers: int = _f(0, "DataLoader worker processes for training and evaluation (they share the "
                          "memory-mapped store; on a GPU machine a few per GPU keep it fed)",
                          lambda v: 0 <= v <= 256, "in [0, 256]")
    prefetch_factor: int = _f(4, "batches each DataLoader worker builds ahead (with num_workers > 0)",
                              _upto(64), "in [1, 64]")
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig,
                                     metadata={"help": "synthetic benchmark parameters"})


@dataclass
class ModelConfig:
    family: str = _f("lxmert", "'lxmert' or 'visualbert'", lambda v: v in ("lxmert", "visualbert"),
                     "one of lxmert, visualbert")
    pretrained: Optional[str] = _f(None, "hub id or local folder with pretrained encoder weights; "
                                   "null for random initialisation")
    tokenizer: Optional[str] = _f(None, "hub id or folder of a BERT tokenizer; null uses the "
                                  "dataset's own (root/tokenizer)")
    hidden_size: int = _f(128, "hidden size (base: 768)", _upto(65536), "in [1, 65,536]")
    num_attention_heads: int = _f(4, "attention heads (base: 12)", _upto(1024), "in [1, 1,024]")
    intermediate_size: int = _f(256, "feed-forward size (base: 3072)", _upto(262144), "in [1, 262,144]")
    l_layers: int = _f(2, "language layers (base: 9)", _upto(128), "in [1, 128]")
    x_layers: int = _f(2, "cross-modality layers (base: 5)", _upto(128), "in [1, 128]")
    r_layers: int = _f(2, "vision (relation) layers (base: 5)", _upto(128), "in [1, 128]")
    num_hidden_layers: int = _f(4, "VisualBERT layers (base: 12)", _upto(128), "in [1, 128]")
    dropout: float = _f(0.1, "dropout of the encoder (LXMERT's answer head has none; Si et al.'s has 0.5)", _fraction,
                        "in [0, 1)")
    head: str = _f("lxmert", "the answer head: 'lxmert' (LXMERT's: Linear, GeLU, LayerNorm, Linear; loaded from a "
                   "converted release's QA head) or 'simple' (Si et al.'s SimpleClassifier: weight-normed Linear, "
                   "ReLU, dropout 0.5, weight-normed Linear; always fresh)", lambda v: v in ("lxmert", "simple"),
                   "one of lxmert, simple")
    answer_prior: Optional[float] = _f(None, "initial probability p of every answer under the sigmoid answer head: "
                                       "the head's output biases are shifted by log(p / (1 - p)) when the model is "
                                       "built (the prior initialisation of Lin et al. 2017, RetinaNet); the order "
                                       "of the answers is unchanged. null: the head as loaded or initialised (the "
                                       "original LXMERT fine-tune)",
                                       lambda v: v is None or 0 < v < 1, "null or in (0, 1)")


@dataclass
class TrainConfig:
    epochs: int = _f(4, "training epochs", _upto(10000), "in [1, 10,000]")
    batch_size: int = _f(32, "global batch size (split over ranks under torchrun)", _upto(10**6), "in [1, 1e6]")
    grad_accum: int = _f(1, "gradient accumulation steps per optimizer step", _upto(10000), "in [1, 10,000]")
    lr: float = _f(5e-5, "peak learning rate", _positive, "> 0")
    weight_decay: float = _f(0.01, "weight decay (AdamW: matrices only, not biases and LayerNorms; BertAdam: every "
                             "parameter)", _non_negative, ">= 0")
    optimizer: str = _f("adamw", "'adamw' (torch's, bias-corrected, eps 1e-8, decay on matrices) or 'bertadam' (the "
                        "original LXMERT code's BertAdam: no bias correction, eps 1e-6, decay on every parameter; "
                        "airsplay/lxmert src/lxrt/optimization.py)", lambda v: v in ("adamw", "bertadam"),
                        "one of adamw, bertadam")
    dense_seed: Optional[int] = _f(None, "a seed the dense fine-tune of every seed uses instead of its own (null: "
                                   "its own); Hashemi et al.'s fine-tunes all ran with param.py's default 9595 "
                                   "(run/vqa_run.bash passes no --seed), so their three seeds share one dense model",
                                   lambda v: v is None or 0 <= v <= MAX_SEED, f"null or in [0, {MAX_SEED}]")
    warmup: float = _f(0.1, "fraction of steps with linear warmup, then linear decay", _fraction, "in [0, 1)")
    clip: float = _f(5.0, "gradient-norm clip; 0 disables", _non_negative, ">= 0")
    loss: str = _f("bce", "loss: bce, lmh or lpf", lambda v: v in ("bce", "lmh", "lpf"), "one of bce, lmh, lpf")
    precision: str = _f("bf16", "autocast on CUDA: fp32, bf16 or fp16 (CPU always runs fp32)",
                        lambda v: v in ("fp32", "bf16", "fp16"), "one of fp32, bf16, fp16")
    compile: bool = _f(False, "torch.compile the model (CUDA)")
    eval_batch_size: int = _f(256, "batch size of evaluation", _upto(10**6), "in [1, 1e6]")
    save_every_steps: int = _f(0, "also checkpoint every N optimizer steps (0: only at epoch ends)",
                               _non_negative, ">= 0")
    log_every: int = _f(50, "optimizer steps between reads of the loss on the host: the running loss is kept "
                        "on the device, and a NaN or infinite loss is found (and named by its step) at the next "
                        "read, before any checkpoint", _upto(10**6), "in [1, 1e6]")


@dataclass
class LotteryConfig:
    modes: list = _f(["low_magnitude", "random", "high_magnitude"], "pruning modes to run (original_high: what "
                     "the original code calls high magnitude, prune/magnitude.py)",
                     lambda v: len(v) > 0 and all(m in PRUNING_MODES for m in v),
                     f"a non-empty list of {', '.join(PRUNING_MODES)}")
    levels: list = _f([0.2, 0.4, 0.6, 0.8], "target sparsities (fractions of the prunable weights)",
                      lambda v: len(v) > 0 and _all_fractions(v) and all(a < b for a, b in zip(v, v[1:]))
                      and len({level_name(x) for x in v}) == len(v),
                      "a strictly increasing non-empty list of values in [0, 1), distinct at 0.01 %")
    schedule: str = _f("iterative", "'iterative' (IMP: each level from the last) or 'oneshot' (each level "
                       "from the dense model)", lambda v: v in ("iterative", "oneshot"),
                       "one of iterative, oneshot")
    scope: str = _f("global", "'global' threshold over all prunable weights, 'layer' (each tensor to the level "
                    "alone) or 'survivors' (Hashemi et al.'s code: rounds removing 10 % of each tensor's surviving "
                    "weights until the prunable set reaches the level; overshoots it)",
                    lambda v: v in ("global", "layer", "survivors"), "one of global, layer, survivors")
    rewind_steps: int = _f(0, "rewind point: 0 = weights before fine-tuning, k = after k dense steps",
                           _non_negative, ">= 0")
    prune_from: str = _f("final", "weights a level is pruned from: 'final' (last epoch) or 'best' (best epoch on "
                         "the validation split, as the original code)", lambda v: v in ("final", "best"),
                         "one of final, best")
    enforce_masks: bool = _f(True, "keep pruned weights at zero while retraining (false: the mask is applied once "
                             "at the rewind point and the optimizer regrows them, as the original code: vqa.py "
                             "lines 242-248 apply it, train() never again)")
    prune_all_parameters: bool = _f(False, "the prunable set holds every parameter matching lottery.prunable "
                                    "(biases, LayerNorm weights and biases too, as the original's state-dict index "
                                    "rule, lottery_ticket_hypothesis.py line 56), not only Linear weights")
    original_high_level: str = _f("named", "original_high: 'named' prunes level s from the low-magnitude mask at s "
                                  "(the original code as committed); 'mirrored' from the mask at 1 - s, which is "
                                  "what its published figures ran (result/lxmert_experiment.json: High_Magnitude-10 "
                                  "ran the 22 rounds of level 90)", lambda v: v in ("named", "mirrored"),
                                  "one of named, mirrored")
    prunable: list = _f(list(PRUNABLE_DEFAULT), "the prunable set: glob patterns over the names of the model's "
                        "Linear and Embedding weights (modeling.prunable_tensors); biases and LayerNorms never match",
                        lambda v: _names(v, allow_empty=False), "a non-empty list of name patterns")
    granularity: str = _f("weights", "what a level removes (prune/structure.py): 'weights' (unstructured), 'heads' "
                          "(attention heads: a level is the fraction of heads removed), 'neurons' (feed-forward "
                          "neurons, likewise) or 'n_m' (round(level x lottery.group) weights of every group of "
                          "lottery.group along the input dimension: level 0.5 is 2:4); sparsity is measured from "
                          "the weights in every case", lambda v: v in STRUCTURES, f"one of {', '.join(STRUCTURES)}")
    importance: str = _f("magnitude", "heads / neurons: a unit's importance, 'magnitude' (root mean square of its "
                         "weights) or 'gradient' (Michel et al. 2019: E|dL/d gate|, normalised per module)",
                         lambda v: v in ("magnitude", "gradient"), "one of magnitude, gradient")
    importance_batches: int = _f(8, "gradient importance: training batches (train.batch_size questions each, a "
                                 "seeded sample) it is averaged over", _upto(100000), "in [1, 100,000]")
    group: int = _f(4, "n_m: the group size M (levels must be multiples of 1/M)", _upto(64), "in [1, 64]")


MODALITIES = ("language", "vision", "cross", "pooler")


def _modality_settings(v: Any) -> bool:
    return all(isinstance(x, dict) and set(x) == set(MODALITIES) and _all_fractions(x.values()) for x in v)


@dataclass
class DebiasConfig:
    stage1_losses: list = _f(["bce", "lmh", "lpf"], "losses of the full fine-tune (stage 1)",
                             lambda v: len(v) > 0 and all(x in ("bce", "lmh", "lpf") for x in v),
                             "a non-empty list of bce, lmh, lpf")
    stage2_losses: list = _f(["bce", "lpf"], "losses of mask training (stage 2)",
                             lambda v: len(v) > 0 and all(x in ("bce", "lmh", "lpf") for x in v),
                             "a non-empty list of bce, lmh, lpf")
    sparsities: list = _f([0.5], "uniform sparsities of mask training: the fraction of every modality's prunable "
                          "weights that is REMOVED (0.7 keeps 30 %)", _all_fractions, "values in [0, 1)")
    modality_sparsities: list = _f([], "per-modality settings, each a mapping {language, vision, cross, pooler} -> "
                                   "the fraction REMOVED, e.g. {language: 0.7, vision: 0.7, cross: 0.7, pooler: 0.7} "
                                   "is Si et al.'s command line '0.3 0.3 0.3 0.7' (keep 30 %)", _modality_settings,
                                   "a list of mappings with exactly the keys language, vision, cross, pooler, "
                                   "each value in [0, 1)")
    prunable: list = _f(list(STUDY_B_PRUNABLE), "the masked set of stage 2: glob patterns over Linear and Embedding "
                        "weight names (default: Si et al.'s, word embeddings included)",
                        lambda v: _names(v, allow_empty=False), "a non-empty list of name patterns")
    # Stage defaults are the paper's (Si et al., Compress-Robust-VQA bash_files/Stage2/run_mask_train_stage2.sh:
    # 20 epochs, batch 256, lr 5e-5, no warmup; Stage3/run_vqa_stage3.sh: 20 epochs, batch 64, lr 5e-5, warmup
    # 34235 steps = 5 of 20 epochs). Stage 1 is the train section (Stage1/run_vqa_stage1.sh: the same as stage 3).
    stage2_epochs: int = _f(20, "mask-training epochs", _upto(10000), "in [1, 10,000]")
    stage2_lr: float = _f(5e-5, "learning rate of mask training (scores and QA head); far larger values flip most "
                          "masks every step", _positive, "> 0")
    stage2_batch_size: int = _f(256, "batch size of mask training (0: train.batch_size)", lambda v: 0 <= v <= 10**6,
                                "in [0, 1e6]")
    stage2_warmup: float = _f(0.0, "warmup fraction of mask training (then linear decay)", _fraction, "in [0, 1)")
    reset_every: int = _f(100, "steps between the per-tensor top-k resets of the scores", _upto(10**9), "in [1, 1e9]")
    stage_start: str = _f("final", "what stage 2 (and a control) starts from: the stage-1 run's 'final' weights, or "
                          "its 'best' on the validation split (stage 3 then from stage 2's best mask and head); Si et "
                          "al. start from the best on the test split, which is never offered",
                          lambda v: v in ("final", "best"), "one of final, best")
    stage3: bool = _f(True, "also fine-tune each pruned model with its mask fixed")
    stage3_epochs: int = _f(20, "epochs of stage 3", _upto(10000), "in [1, 10,000]")
    stage3_lr: float = _f(5e-5, "learning rate of stage 3 (0: train.lr)", _non_negative, ">= 0")
    stage3_batch_size: int = _f(64, "batch size of stage 3 (0: train.batch_size)", lambda v: 0 <= v <= 10**6,
                                "in [0, 1e6]")
    stage3_warmup: float = _f(0.25, "warmup fraction of stage 3 (then linear decay)", _fraction, "in [0, 1)")
    controls: bool = _f(True, "same-compute controls: each stage-1 model also trained densely, with the stage-2 "
                        "loss, for as many epochs as stages 2 + 3 add")
    lmh_entropy: float = _f(0.36, "weight of the LMH entropy penalty", _non_negative, ">= 0")
    lpf_gamma: float = _f(5.0, "LPF focusing exponent", _non_negative, ">= 0")
    lottery_baseline: bool = _f(True, "also report lottery-ticket (low-magnitude) masks at the uniform sparsities")

    def stage2_schedule(self) -> dict:
        """What mask training sets of its training schedule (the rest is the train section's; a batch size
        of 0 means train.batch_size)."""
        return {"epochs": self.stage2_epochs, "lr": self.stage2_lr, "warmup": self.stage2_warmup,
                **({"batch_size": self.stage2_batch_size} if self.stage2_batch_size else {})}

    def stage3_schedule(self) -> dict:
        """The same for stage 3 (a learning rate or batch size of 0 means the train section's)."""
        return {"epochs": self.stage3_epochs, "warmup": self.stage3_warmup,
                **({"lr": self.stage3_lr} if self.stage3_lr else {}),
                **({"batch_size": self.stage3_batch_size} if self.stage3_batch_size else {})}

    def extra_epochs(self) -> int:
        """The epochs stages 2 and 3 add to a stage-1 model (what a same-compute control trains for)."""
        return self.stage2_epochs + (self.stage3_epochs if self.stage3 else 0)


@dataclass
class BlindConfig:
    """The question-only baselines: a bag-of-words MLP on the question (modeling.blind), trained with Adam, and
    the study's model fine-tuned without the image (`lxmert`)."""

    epochs: int = _f(8, "epochs of the question-only baseline", _upto(10000), "in [1, 10,000]")
    lr: float = _f(2e-3, "learning rate (Adam, constant)", _positive, "> 0")
    batch_size: int = _f(256, "batch size", _upto(10**6), "in [1, 1e6]")
    lxmert: bool = _f(True, "also fine-tune the study's own model with the image removed (every region feature and "
                      "box zero), same loss and schedule as the dense fine-tune, for each loss a study reports: the "
                      "question-only LXMERT row beside the bag-of-words one")


@dataclass
class PretrainConfig:
    """The embedded benchmark's stand-in for released LXMERT weights (lxmert/embedded/pretrain.py): LXMERT's own
    pretraining tasks on the benchmark's pretraining images; real runs load released weights instead."""

    export: str = _f("models/embedded_pretrain/encoder", "folder of the stand-in encoder (LxmertModel + tokenizer); "
                     "the embedded configs read it as model.pretrained")
    seed: int = _f(0, "seed of the stand-in pretraining", lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]")
    epochs: int = _f(24, "pretraining epochs (the last one is exported; nothing is selected)", _upto(10000), "in [1, 10,000]")
    batch_size: int = _f(32, "pretraining batch size", _upto(10**6), "in [1, 1e6]")
    lr: float = _f(1e-3, "peak learning rate (AdamW, linear warmup and decay)", _positive, "> 0")
    warmup: float = _f(0.2, "warmup fraction of the steps", _fraction, "in [0, 1)")
    clip: float = _f(5.0, "gradient-norm clip; 0 disables", _non_negative, ">= 0")
    dropout: float = _f(0.1, "dropout of the encoder during pretraining (fine-tuning uses model.dropout)", _fraction,
                        "in [0, 1)")
    init_std: float = _f(0.1, "std of the initial weights (transformers' initializer_range; its 0.02 is set for "
                         "768-wide models and left the 64-wide stand-in's attention uniform for thousands of steps)",
                         _positive, "> 0")
    token_mask: float = _f(0.15, "share of caption tokens masked (masked language modelling)", _fraction, "in [0, 1)")
    region_mask: float = _f(0.15, "share of regions masked (masked object prediction)", _fraction, "in [0, 1)")
    held_out: float = _f(0.1, "share of the pretraining images only evaluated (reported, never selected on)",
                         _fraction, "in [0, 1)")


@dataclass
class CheckpointConfig:
    """What a finished unit keeps on disk (it changes no result, so it is in no settings record)."""

    keep: str = _f("minimal", "'minimal': a finished unit keeps its result, predictions, mask (bit-packed) and the "
                   "weights later units start from or rewind to (seed init, dense and stage-1 best and final, the "
                   "last level of an iterative chain, stage 2's masks and answer heads, from which its weights are "
                   "rebuilt exactly); the weights of levels, stage 3, controls and lottery tickets are dropped "
                   "(docs/RUNNING.md says how to get them back). 'all': every weight file stays",
                   lambda v: v in ("minimal", "all"), "one of minimal, all")


@dataclass
class Config:
    experiment: str = _f("embedded", "name; outputs go to models/<name>, logs/<name>.log, result/<name>", _name,
                         f"a name of {NAME_RULE}")
    seeds: list = _f([0], "seeds; each controls data order, initialisation and random pruning",
                     lambda v: len(v) > 0 and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED
                                                  for s in v), f"a non-empty list of ints in [0, {MAX_SEED}]")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "fine-tuning"})
    lottery: LotteryConfig = field(default_factory=LotteryConfig, metadata={"help": "lottery tickets"})
    debias: DebiasConfig = field(default_factory=DebiasConfig, metadata={"help": "compress and debias"})
    device: str = _f("auto", "where runs train: 'auto' (CUDA when torch sees a GPU, else the CPU; a study on real "
                     "data, data.dataset=prepared, then refuses to start), 'cuda' (refused without a GPU) or 'cpu' "
                     "(also on a GPU machine)", lambda v: v in ("auto", "cuda", "cpu"), "one of auto, cuda, cpu")
    blind: BlindConfig = field(default_factory=BlindConfig, metadata={"help": "question-only baseline"})
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig,
                                          metadata={"help": "what finished units keep on disk"})
    pretrain: PretrainConfig = field(default_factory=PretrainConfig,
                                     metadata={"help": "stand-in pretraining of the embedded benchmark"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (list, dict, str, bool):
        return isinstance(value, tp)
    return True


def _yaml_float(text: str) -> Any:
    """PyYAML (YAML 1.1) reads exponent numbers without a dot, like 1e-3, as strings; take them as floats."""
    try:
        return float(text)
    except ValueError:
        return text


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a value (YAML's .nan / .inf pass every range check written with < and >
    as NaN does, or as an infinite learning rate would)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(x) for x in value)
    if isinstance(value, dict):
        return all(_finite(x) for x in value.values())
    return True


def _passes(check: Callable[[Any], bool], value: Any) -> bool:
    """A range check; a list with elements of the wrong type (a string among numbers) fails it."""
    try:
        return bool(check(value))
    except TypeError:
        return False


def _build(cls: type, values: dict, where: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{where.rstrip('.') or 'top level'}' must be a mapping, "
                          f"got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            if f"{where}{key}" in RENAMED_KEYS:
                raise ConfigError(f"{source}: key '{where}{key}' is now '{RENAMED_KEYS[where + key]}'")
            if f"{where}{key}" in REMOVED_KEYS:
                raise ConfigError(f"{source}: key '{where}{key}' was removed: {REMOVED_KEYS[where + key]}")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{where}{key}' (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        value, tp, key = values[name], hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", source)
            continue
        if tp is float and isinstance(value, str):
            value = _yaml_float(value)
        if not _type_ok(value, tp):
            want = getattr(tp, "__name__", str(tp))
            raise ConfigError(f"{source}: key '{key}' must be {want}, got {value!r}")
        if tp is float and isinstance(value, int):
            value = float(value)
        if not _finite(value):
            raise ConfigError(f"{source}: key '{key}' = {value!r} is not a finite number")
        check = f.metadata.get("check")
        if check is not None and value is not None and not _passes(check, value):
            raise ConfigError(f"{source}: key '{key}' = {value!r} is out of range: must be {f.metadata['rule']}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{where}{' '.join(str(what).split())}"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_DEPTH = 20  # a config is a few levels deep; anything deeper (or recursive, through anchors) is a mistake


def _depth(value: Any, seen: tuple = ()) -> int:
    if id(value) in seen:
        return MAX_DEPTH + 1  # an anchor that contains itself
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        if len(seen) > MAX_DEPTH:
            return MAX_DEPTH + 1
        return 1 + max((_depth(v, seen + (id(value),)) for v in value), default=0)
    return 0


def _safe_yaml(text: str, where: str) -> Any:
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    if _depth(value) > MAX_DEPTH:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep (or an anchor that contains itself)")
    return value


def parse_overrides(items: list[str]) -> dict:
    """Turn ['train.epochs=2', 'seeds=[0,1]'] into a nested dict (values parsed as safe YAML)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"override '{item}': '{key}' is not a key like section.name")
        _set_dotted(tree, key.strip(), _safe_yaml(raw, f"override '{item}'"))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path) -> Any:
    """The YAML tree of an experiment file as written (not validated); unreadable files are one error line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a YAML config?") from None
    return _safe_yaml(text, str(path)) or {}


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML experiment file, apply `key=value` overrides, validate everything."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        values = read_config_file(path)
    if overrides:
        values = _merge(values, parse_overrides(overrides))
        source += " + overrides"
    config = _build(Config, values, "", source)
    _cross_checks(config, source)
    return config


def _cross_checks(config: Config, source: str) -> None:
    emb, d = config.data.embedded, config.data
    if emb.min_objects > emb.max_objects:
        raise ConfigError(f"{source}: key 'data.embedded.min_objects' ({emb.min_objects}) exceeds "
                          f"'data.embedded.max_objects' ({emb.max_objects})")
    if emb.max_objects > emb.num_regions:
        raise ConfigError(f"{source}: key 'data.embedded.max_objects' ({emb.max_objects}) exceeds "
                          f"'data.embedded.num_regions' ({emb.num_regions})")
    if config.model.hidden_size % config.model.num_attention_heads:
        raise ConfigError(f"{source}: key 'model.hidden_size' ({config.model.hidden_size}) must be a "
                          f"multiple of 'model.num_attention_heads' ({config.model.num_attention_heads})")
    if config.model.family == "visualbert" and config.debias.modality_sparsities:
        raise ConfigError(f"{source}: key 'debias.modality_sparsities': VisualBERT is a single-stream model; Si et "
                          "al. prune it with one sparsity for every module (debias.sparsities)")
    if "original_high" in config.lottery.modes and config.lottery.schedule != "oneshot":
        raise ConfigError(f"{source}: key 'lottery.modes': original_high prunes each level from the dense model, as "
                          "the original study (lottery.schedule: oneshot)")
    lc = config.lottery
    if lc.granularity != "weights":
        if "original_high" in lc.modes:
            raise ConfigError(f"{source}: key 'lottery.modes': original_high is defined for single weights only "
                              f"(lottery.granularity {lc.granularity})")
        if lc.scope == "survivors":
            raise ConfigError(f"{source}: key 'lottery.scope': survivors rounds are defined for single weights only; "
                              f"use global or layer with lottery.granularity {lc.granularity}")
        if lc.prune_all_parameters:
            raise ConfigError(f"{source}: key 'lottery.prune_all_parameters': structured granularities prune weight "
                              "matrices only")
    if lc.granularity == "n_m":
        if lc.importance != "magnitude":
            raise ConfigError(f"{source}: key 'lottery.importance': N:M masks rank weights by magnitude "
                              "(gradient importance is for heads and neurons)")
        bad = [x for x in lc.levels if abs(round(x * lc.group) - x * lc.group) > 1e-6]
        if bad:
            raise ConfigError(f"{source}: key 'lottery.levels': {bad} not multiples of 1/{lc.group} (lottery.group); "
                              f"an N:M mask prunes a whole number of weights per group, e.g. "
                              f"{[round(k / lc.group, 4) for k in range(1, lc.group)]}")
    if not config.debias.sparsities and not config.debias.modality_sparsities:
        raise ConfigError(f"{source}: keys 'debias.sparsities' and 'debias.modality_sparsities' are both empty: "
                          "stages 2 and 3 would be skipped")
    if emb.pretrain_min_objects > emb.pretrain_max_objects or emb.pretrain_max_objects > emb.num_regions:
        raise ConfigError(f"{source}: keys 'data.embedded.pretrain_min_objects' ({emb.pretrain_min_objects}) and "
                          f"'data.embedded.pretrain_max_objects' ({emb.pretrain_max_objects}) must satisfy "
                          f"min <= max <= data.embedded.num_regions ({emb.num_regions})")
    db = config.debias
    grids = {"seeds": config.seeds, "lottery.modes": config.lottery.modes, "debias.stage1_losses": db.stage1_losses,
             "debias.stage2_losses": db.stage2_losses, "debias.sparsities": db.sparsities, "data.test": d.test,
             "data.train": d.train,
             "debias.modality_sparsities": [tuple(m[k] for k in MODALITIES) for m in db.modality_sparsities]}
    for key, values in grids.items():
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"{source}: key '{key}' has repeated values: {', '.join(repeated)}")
    for m in db.modality_sparsities:
        if len(set(m.values())) == 1 and next(iter(m.values())) in db.sparsities:
            raise ConfigError(f"{source}: key 'debias.modality_sparsities': {m} removes the same fraction of every "
                              f"modality as the uniform sparsity {next(iter(m.values()))} in debias.sparsities "
                              "(the same masks twice); drop one of them")
    d = config.data
    for name in [*d.train, *d.test]:
        if name == d.valid:
            raise ConfigError(f"{source}: key 'data.valid' ({d.valid!r}) is also in data.train or data.test: "
                              "model selection needs a split of its own")
    for name in d.train:
        if TEST_SPLIT.search(name):
            raise ConfigError(f"{source}: key 'data.train' names the test split {name!r}")


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key with its default and help text (for `python -m lxmert config --help`)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return lines
