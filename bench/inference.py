"""Inference latency and memory of compact structured tickets against unstructured sparsity, at LXMERT base size
on the CPU, and the accuracy the embedded studies measured against the speed-up of their structure.

    python -m bench.inference [--reps N] [--threads T] [--results result/embedded] [--models DIR] [--quick]
                              [--no-docs]

Model: the base shapes of bench/training.py (hidden 768, 12 heads, intermediate 3072, 9 language / 5 cross /
5 vision layers, 36 regions x 2048-d features, 20 tokens, 3,129 answers), randomly initialised under
torch.manual_seed(0); eval mode, torch.no_grad(), float32, on the CPU with --threads torch threads.

Variants, each made from a copy of the dense model:
  heads / neurons L  the same fraction L of the heads of every attention module (of the neurons of every
                     feed-forward block) removed - prune.structure's layer scope; which units go does not change
                     the time, so the first ones - then the matrices physically cut (prune.structure.shrink);
  masked L           a global magnitude mask at weight sparsity L over the prunable set (every Linear weight of
                     the encoder and the pooler) applied to the dense weights: the dense kernels, zeros included;
  CSR L              the same masked weights stored as torch sparse CSR matrices, each of those Linear layers
                     replaced by CSRLinear: y = (W_csr @ x^T)^T + b with torch.addmm (MKL sparse BLAS on x86);
  2:4                torch.sparse.to_sparse_semi_structured needs CUDA (sm80+): run only where CUDA is available
                     (fp16 dense against fp16 2:4), otherwise recorded as not run.
Every compact and CSR model is checked once against its masked model (logits allclose, atol 1e-4) before it is
timed: the bench never times a wrong model.

Latency: --reps timed forwards at batch 32 after one warm-up forward, and 4 x --reps at batch 1 after two (a
batch-1 forward is ~30x cheaper); median, min and max in ms, time.perf_counter around each forward. Structures
only the accuracy picture needs: batch 32 only, up to --picture-reps forwards, none begun after 15 s of them
(CSR at low sparsity takes several times the dense forward; its speed-up needs no third decimal).
Memory: the bytes of the stored weights (CSR: values + column indices + row pointers) and the peak RSS increase of
one batch-32 forward (after one batch-32 forward of the dense model in that process and a batch-1 forward of the
variant, so that one-time buffers are not counted), measured in a separate process started with
MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every block of 64 kB or more on its own and unmaps it when it is
freed, so no freed memory is reused unseen and the resident set follows the live tensors; the high-water mark is
reset (/proc/self/clear_refs 5) before the forward and VmHWM - VmRSS read after it. Timing runs with the default
allocator (the forced mapping costs page faults on every forward).

Accuracy against speed-up (--results, default result/embedded; masks under --models, default models/<its name>):
for each lottery*.json, mode and level: accuracy = mean ± std of accuracy_retrained over the seeds.
  heads / neurons  From every seed's saved mask, the fraction of units each module keeps (a head is kept when any
                   of its output-projection columns is kept; prune.structure's groups of an embedded-size model
                   built from the unit's settings.json). Modules are grouped by role - their name with the layer
                   index replaced by '*', e.g. encoder.encoder.x_layers.*.visual_attention.att (cross attention)
                   - and a role's kept fraction is averaged over its modules and the seeds. The embedded model
                   has fewer layers (2/2/2) than base (9/5/5) but the same roles, so every base module of a role
                   keeps round(fraction x its units) units (at least one), and the compact base model of that
                   structure is timed at batch 32.
  weights          two points per level: the masked model on dense kernels (its latency is the masked 90 % row:
                   a mask changes no kernel) and CSR at the level's target sparsity (global magnitude mask on the
                   base model, nearly uniform over its tensors).
  N:M              no CPU kernel: plotted at speed-up 1.0 (2:4 needs CUDA).
Speed-up = dense / variant median latency at batch 32. Writes <results>/accuracy_vs_speedup.png and .md.

docs/PERFORMANCE.md: the section between the markers BEGIN and END below is replaced (appended the first time),
unless --no-docs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import FormatStrFormatter, NullLocator
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DOC, machine  # noqa: E402
from bench.training import SIZES, Size, random_batch  # noqa: E402
from lxmert.core import paths  # noqa: E402
from lxmert.core.files import read_json, read_object, write_text  # noqa: E402
from lxmert.modeling.vqa import build_model, model_from_config  # noqa: E402
from lxmert.prune import structure as st  # noqa: E402
from lxmert.prune.magnitude import prune  # noqa: E402
from lxmert.prune.masks import apply_mask, full_mask, load_mask, load_mask_for  # noqa: E402
from lxmert.prune.prunable import prunable_tensors  # noqa: E402
from lxmert.studies.figures import mean_std, plt, save_figure  # noqa: E402
from lxmert.studies.lottery_report import MODES_ORDER, stem  # noqa: E402
from lxmert.studies.saved import unit_settings_file  # noqa: E402

BEGIN, END = "<!-- bench.inference: begin -->", "<!-- bench.inference: end -->"
LEVELS, QUICK_LEVELS = (0.2, 0.4, 0.6, 0.8, 0.9), (0.5, 0.9)
UNSTRUCTURED = 0.9  # the sparsity of the masked and CSR table rows
PICTURE_BUDGET_S = 15.0  # seconds of batch-32 forwards after which a picture point starts no more
WORKER = "--memory-worker"
STUDY_FILES = ("lottery.json", "lottery_heads.json", "lottery_neurons.json", "lottery_nm4.json")
ROLE_NAMES = {"layer.*.attention.self": "L", "r_layers.*.attention.self": "V", "x_layers.*.visual_attention.att": "X",
              "x_layers.*.lang_self_att.self": "XL", "x_layers.*.visn_self_att.self": "XV",
              "layer.*.intermediate.dense": "L", "r_layers.*.intermediate.dense": "V",
              "x_layers.*.lang_inter.dense": "XL", "x_layers.*.visn_inter.dense": "XV"}
ROLE_LEGEND = ("L language layers, V vision layers, X cross attention, XL / XV the cross layers' language / vision "
               "self-attention or feed-forward")


# -- the models ------------------------------------------------------------------------------------------------

class CSRLinear(nn.Module):
    """A Linear layer with its weight stored as a torch sparse CSR matrix (only the nonzero weights):
    y = (W_csr @ x^T)^T + b, computed by torch.addmm with a sparse first operand."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("weight_csr", linear.weight.detach().to_sparse_csr())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = x.reshape(-1, self.in_features).t()
        y = torch.sparse.mm(self.weight_csr, columns) if self.bias is None \
            else torch.addmm(self.bias[:, None], self.weight_csr, columns)
        return y.t().contiguous().reshape(*x.shape[:-1], self.out_features)


def to_csr(model: nn.Module, names: list[str]) -> None:
    """Replace, in place, the Linear layer of every weight in `names` by a CSRLinear."""
    for name in names:
        module = name.rpartition(".")[0]
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, CSRLinear(model.get_submodule(module)))


def stored(model: nn.Module) -> tuple[int, int]:
    """(values, bytes) of what the model stores: its parameters and the CSR weights with their index arrays."""
    values = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, CSRLinear):
            w = module.weight_csr
            values += w.values().numel()
            nbytes += sum(t.numel() * t.element_size() for t in (w.values(), w.crow_indices(), w.col_indices()))
    return values, nbytes


@dataclass(frozen=True)
class Variant:
    """One model to time: kind dense | heads | neurons | masked | csr. Heads and neurons: units removed per group
    (prune.structure.structure_groups order); masked and CSR: the weight sparsity."""

    kind: str
    level: float = 0.0
    removed: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Variant:
        return cls(d["kind"], d["level"], tuple(d["removed"]))


class Bench:
    """The dense base-size model, its prunable set and structured groups, and the input batches."""

    def __init__(self, size: Size = SIZES["base"], seed: int = 0):
        self.size = size
        torch.manual_seed(seed)
        self.dense = build_model(size.model, size.vocab, size.feat_dim, size.answers).eval()
        self.prunable = prunable_tensors(self.dense)
        self.groups = {kind: st.structure_groups(self.dense, kind, self.prunable) for kind in ("heads", "neurons")}
        gen = torch.Generator().manual_seed(seed)
        self.batches = {b: random_batch(size, b, torch.device("cpu"), gen) for b in (1, 32)}
        self.check = random_batch(size, 2, torch.device("cpu"), gen)
        self.check["attention_mask"][1, size.tokens // 2:] = 0  # one padded question

    def uniform(self, kind: str, level: float) -> Variant:
        """The fraction `level` of the units removed from every module (prune.structure's layer scope)."""
        return Variant(kind, removed=tuple(st.unit_counts(self.groups[kind], level, "layer")))

    def from_fractions(self, kind: str, kept: dict[str, float]) -> Variant:
        """Every module keeps its role's fraction of units (at least one); roles not in `kept` stay whole."""
        return Variant(kind, removed=tuple(g.count - max(1, round(kept.get(role(g.module), 1.0) * g.count))
                                           for g in self.groups[kind]))

    def build(self, v: Variant) -> nn.Module:
        """A copy of the dense model made into the variant; compact and CSR models checked against the masked one."""
        model = copy.deepcopy(self.dense)
        if v.kind == "dense":
            return model
        if v.kind in ("heads", "neurons"):  # which units go does not change the time: the first ones
            groups = self.groups[v.kind]
            alive = [np.ones(g.count, bool) for g in groups]
            pruned = st.select_units("low_magnitude", groups, [np.zeros(g.count) for g in groups], alive,
                                     list(v.removed), [0])
            names = [n for g in groups for n in g.rows + g.cols]
            mask = st.unit_mask(groups, pruned, {n: torch.ones_like(model.get_parameter(n), dtype=torch.bool)
                                                 for n in names})
        else:
            mask = prune("low_magnitude", model, self.prunable, full_mask(model, self.prunable), v.level, "global")
        apply_mask(model, mask)
        del mask
        if v.kind == "masked":
            return model
        with torch.no_grad():
            expected = model(self.check)[0]
            if v.kind == "csr":
                to_csr(model, [t.name for t in self.prunable])
            else:
                st.shrink(model, {v.kind: st.kept_units(model, v.kind, self.prunable)})
            got = model(self.check)[0]
        if not torch.allclose(got, expected, atol=1e-4):
            raise RuntimeError(f"{self.label(v)}: logits differ from the masked model's by up to "
                               f"{(got - expected).abs().max().item():.2e}; not timing a wrong model")
        return model

    def label(self, v: Variant) -> str:
        if v.kind == "dense":
            return "dense"
        if v.kind == "masked":
            return f"masked {100 * v.level:g} %, dense kernels"
        if v.kind == "csr":
            return f"CSR {100 * v.level:g} % (torch.addmm, sparse CSR weights)"
        groups = self.groups[v.kind]
        counts = {g.count for g in groups}
        removed = 100 * sum(v.removed) / sum(g.count for g in groups)
        if len(set(v.removed)) == 1 and len(counts) == 1:
            count = counts.pop()
            return f"{v.kind} compact, {count - v.removed[0]}/{count} kept per module ({removed:.0f} % removed)"
        return f"{v.kind} compact, {removed:.0f} % removed ({structure_text(groups, v.removed)})"


def role(module: str) -> str:
    """A module's role in the stack: its name with the layer index replaced by '*'."""
    return re.sub(r"\.\d+\.", ".*.", module)


def structure_text(groups: list[st.Group], removed: tuple[int, ...]) -> str:
    """Units kept per role at base size, e.g. 'L 7/12, V 8/12, X 9/12, XL 7/12, XV 7/12'."""
    kept: dict[str, list[int]] = defaultdict(list)
    for g, r in zip(groups, removed):
        kept[role(g.module)].append(g.count - r)
    count = {role(g.module): g.count for g in groups}
    out = []
    for r, values in kept.items():
        short = ROLE_NAMES.get(r.removeprefix("encoder.encoder."), r)
        n = f"{values[0]}" if len(set(values)) == 1 else f"{min(values)}-{max(values)}"
        out.append(f"{short} {n}/{count[r]}")
    return ", ".join(out)


# -- measurement -----------------------------------------------------------------------------------------------

def latency_ms(model: nn.Module, batch: dict, reps: int, warmup: int, budget_s: float = float("inf")) -> list[float]:
    """Milliseconds of each of `reps` forwards after `warmup` untimed ones (CUDA: synchronised); fewer (at least
    one) once the timed forwards have taken `budget_s` seconds."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(batch)
        sync()
        for _ in range(reps):
            start = time.perf_counter()
            model(batch)
            sync()
            times.append(1000 * (time.perf_counter() - start))
            if sum(times) > 1000 * budget_s:
                break
    return times


def cell(times: list[float] | None) -> str:
    """'median [min-max]' in ms."""
    if not times:
        return "-"
    return f"{statistics.median(times):.1f} [{min(times):.1f}-{max(times):.1f}]"


def time_variant(bench: Bench, v: Variant, reps: int, table: bool) -> dict:
    """Build a variant and time it with its stored size. A table row: batch 1 (4 x reps after 2 warm-ups) and
    batch 32 (reps after 1 warm-up). A point of the picture only: batch 32, no warm-up (the model has run the
    check batch), up to reps forwards but none begun after PICTURE_BUDGET_S seconds of them."""
    started = time.perf_counter()
    model = bench.build(v)
    values, nbytes = stored(model)
    out = {"values": values, "bytes": nbytes,
           "b1": latency_ms(model, bench.batches[1], 4 * reps, 2) if table else None,
           "b32": latency_ms(model, bench.batches[32], reps, 1) if table
           else latency_ms(model, bench.batches[32], reps, 0, PICTURE_BUDGET_S)}
    del model
    gc.collect()
    print(f"  {bench.label(v)}: batch 1 {cell(out['b1'])} ms, batch 32 {cell(out['b32'])} ms "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def forward_peak_mb(model: nn.Module, batch: dict) -> float:
    """Peak resident memory above the level before one forward, in MB: the high-water mark is reset first."""
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with torch.no_grad():
        model(batch)
    return (_status_kib("VmHWM") - before) * 1024 / 1e6


def memory_worker(variants: list[dict], threads: int) -> None:
    """In a process started by measure_memory: the forward peak of each variant, as one JSON list on stdout."""
    torch.set_num_threads(threads)
    bench = Bench()
    with torch.no_grad():
        bench.dense(bench.batches[32])  # once per process: thread pools and kernel buffers sized for batch 32
    out = []
    for v in map(Variant.from_json, variants):
        model = bench.build(v)
        with torch.no_grad():
            model(bench.batches[1])  # the variant's own first-call allocations
        out.append(forward_peak_mb(model, bench.batches[32]))
        del model
    print(json.dumps(out))


def measure_memory(variants: list[Variant], threads: int) -> dict[Variant, float]:
    """The forward peaks, measured in a fresh process with every large block mapped on its own; {} on failure."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "bench.inference", WORKER, json.dumps([v.to_json() for v in variants]), str(threads)]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        print("memory not measured: the worker failed:", *done.stderr.strip().splitlines()[-3:], sep="\n  ")
        return {}
    return dict(zip(variants, json.loads(done.stdout.strip().splitlines()[-1])))


def semi_structured_rows(bench: Bench, reps: int) -> list[list[str]]:
    """UNTESTED (written on a machine without CUDA): the dense model in fp16 on CUDA against the same model with a
    2:4 mask (prune_n_m at 0.5, groups of 4) whose eligible Linear weights (both sizes multiples of 64) are
    torch.sparse.to_sparse_semi_structured tensors. Batch 32 and batch 1, speed-up against dense fp16."""
    from torch.sparse import to_sparse_semi_structured

    model = copy.deepcopy(bench.dense).half().cuda()
    batches = {b: {k: (v.half() if v.is_floating_point() else v).cuda() for k, v in x.items()}
               for b, x in bench.batches.items()}
    dense = {b: latency_ms(model, batches[b], reps * (4 if b == 1 else 1), 3) for b in (1, 32)}
    mask = st.prune_n_m("low_magnitude", model, bench.prunable, full_mask(model, bench.prunable), 0.5, 4, 0, 0.5)
    apply_mask(model, mask)
    with torch.no_grad():
        expected = model(batches[32])[0]
        for t in bench.prunable:
            linear = model.get_submodule(t.name.rpartition(".")[0])
            if isinstance(linear, nn.Linear) and linear.weight.shape[0] % 64 == 0 and linear.weight.shape[1] % 64 == 0:
                linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight), requires_grad=False)
        got = model(batches[32])[0]
    if not torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=1e-2):
        raise RuntimeError("2:4 logits differ from the masked fp16 model's")
    sparse = {b: latency_ms(model, batches[b], reps * (4 if b == 1 else 1), 3) for b in (1, 32)}
    speed = statistics.median(dense[32]) / statistics.median(sparse[32])
    return [["dense fp16 (CUDA)", "-", "-", "-", cell(dense[1]), cell(dense[32]), "-"],
            ["2:4 fp16 (CUDA, to_sparse_semi_structured)", "-", "-", "-", cell(sparse[1]), cell(sparse[32]),
             f"{speed:.2f} vs dense fp16"]]


# -- accuracy against speed-up ---------------------------------------------------------------------------------

@dataclass
class Point:
    """One (granularity, mode, level) of an embedded study and the base-size variant whose latency it gets."""

    series: str  # the granularity as plotted: weights (dense kernels), weights (CSR), heads, neurons, N:M
    mode: str
    level: float
    measured: float  # mean measured sparsity, %
    accuracy: list[float]
    variant: Variant | None  # None: no CPU kernel (N:M)
    structure: str = ""
    speedup: float | None = field(default=None)
    latency: float | None = field(default=None)


def embedded_model(settings: dict, mask: dict[str, torch.Tensor]) -> nn.Module:
    """An untrained model of the study's size (settings.json), with the region-feature size of its mask."""
    from transformers import LxmertConfig

    if settings["model.family"] != "lxmert":
        raise ValueError(f"model.family {settings['model.family']}: only LXMERT's roles map to the base model")
    feats = mask.get("encoder.encoder.visn_fc.visn_fc.weight")
    words = mask.get("encoder.embeddings.word_embeddings.weight")
    config = LxmertConfig(vocab_size=8 if words is None else words.shape[0],
                          hidden_size=settings["model.hidden_size"],
                          num_attention_heads=settings["model.num_attention_heads"],
                          intermediate_size=settings["model.intermediate_size"], l_layers=settings["model.l_layers"],
                          x_layers=settings["model.x_layers"], r_layers=settings["model.r_layers"],
                          visual_feat_dim=2048 if feats is None else feats.shape[1], visual_pos_dim=4)
    return model_from_config("lxmert", config.to_dict(), 2, "lxmert")


def kept_fractions(folders: list[Path], top: Path, kind: str) -> dict[str, float]:
    """Role -> fraction of units kept, averaged over the modules of the role and the seeds' masks."""
    kept: dict[str, list[float]] = defaultdict(list)
    for folder in folders:
        mask, _ = load_mask(folder / paths.MASK)
        model = embedded_model(read_json(unit_settings_file(folder, top), "unit settings"), mask)
        names = list(mask)
        mask = load_mask_for(folder / paths.MASK, model, names)  # refuses shapes that do not fit the model
        for g in st.structure_groups(model, kind, prunable_tensors(model, names)):
            kept[role(g.module)].append(float(st.alive_units(g, mask).mean()))
    return {r: float(np.mean(v)) for r, v in kept.items()}


def study_points(bench: Bench, path: Path, models: Path) -> tuple[list[Point], dict]:
    """The points of one lottery*.json (accuracy per mode and level, and the variant that times its structure),
    and the result itself."""
    result = read_object(path, ("experiment", "valid_split", "seeds", "dense", "rows"), "lottery result")
    granularity = result.get("granularity", "weights")
    tag = stem(result)[len("lottery"):]
    rows: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in result["rows"]:
        rows[(row["mode"], row["target_sparsity"])].append(row)
    points = []
    order = {m: i for i, m in enumerate(MODES_ORDER)}
    for (mode, level), group in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        accuracy = [r["accuracy_retrained"] for r in group]
        measured = 100 * float(np.mean([r["measured_sparsity"] for r in group]))
        common = {"mode": mode, "level": level, "measured": measured, "accuracy": accuracy}
        if granularity == "weights":
            points.append(Point("weights (dense kernels)", variant=Variant("masked", UNSTRUCTURED), **common))
            points.append(Point("weights (CSR)", variant=Variant("csr", level), **common))
        elif granularity in ("heads", "neurons"):
            folders = [models / paths.level(paths.chain(r["seed"], result["schedule"], result["scope"], mode, tag),
                                            level) for r in group]
            missing = [f for f in folders if not (f / paths.MASK).exists()]
            if missing:
                print(f"{path.name}: {mode} {100 * level:g} %: no mask at {missing[0] / paths.MASK}; point skipped")
                continue
            variant = bench.from_fractions(granularity, kept_fractions(folders, models, granularity))
            points.append(Point(granularity, variant=variant, **common,
                                structure=structure_text(bench.groups[granularity], variant.removed)))
        else:
            points.append(Point("N:M", variant=None, **common, structure=f"{granularity} group {result.get('group')}"))
    return points, result


def read_studies(bench: Bench, results: Path, models: Path) -> tuple[list[Point], dict | None, list[str]]:
    """Every study's points, the result whose dense and question-only accuracies the picture shows, and notes."""
    notes = [f"{results / name}: not found, skipped" for name in STUDY_FILES if not (results / name).exists()]
    points, reference = [], None
    for path in sorted(results.glob("lottery*.json")):
        try:
            found, result = study_points(bench, path, models)
            points += found
            reference = reference or result
        except Exception as e:  # one unreadable study leaves the others
            notes.append(f"{path}: skipped ({type(e).__name__}: {e})")
    for note in notes:
        print(note)
    return points, reference, notes


def question_only(result: dict) -> tuple[float | None, str]:
    """The question-only LXMERT's validation accuracy (mean over seeds), else the blind baseline's."""
    valid = result["valid_split"]
    rows = [r["final"][valid]["overall"] for r in result.get("question_only") or [] if valid in r.get("final", {})]
    if rows:
        return float(np.mean(rows)), "question-only LXMERT"
    blind = result["dense"].get("blind", {}).get("mean")
    return blind, "question-only baseline (blind)"


SERIES = ("weights (dense kernels)", "weights (CSR)", "heads", "neurons", "N:M")


def plot_points(points: list[Point], reference: dict, path: Path) -> None:
    """Accuracy against speed-up: one colour per granularity, one marker per mode, the level beside each point,
    the dense model at (1, its accuracy), the question-only accuracy dashed."""
    qo, qo_label = question_only(reference)
    markers, colours = dict(zip(MODES_ORDER, "os^D")), {s: f"C{i}" for i, s in enumerate(SERIES)}
    series: dict[tuple[str, str], list[Point]] = defaultdict(list)
    for p in points:
        series[(p.series, p.mode)].append(p)
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, mode), group in series.items():
        xs, ys = [p.speedup for p in group], [np.mean(p.accuracy) for p in group]
        ax.scatter(xs, ys, color=colours.get(name, "k"), marker=markers.get(mode, "x"), alpha=0.8,
                   label=f"{name}, {mode}" + (" - no CPU kernel (2:4 needs CUDA)" if name == "N:M" else ""))
        for p, x, y in zip(group, xs, ys):
            ax.annotate(f"{100 * p.level:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([1.0], [reference["dense"]["accuracy"]["mean"]], color="k", marker="*", s=150, label="dense", zorder=3)
    if qo is not None:
        ax.axhline(qo, ls="--", color="gray", label=qo_label)
    ax.set_xscale("log")
    speeds = [p.speedup for p in points] + [1.0]
    ax.set_xticks([t for t in (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.25, 1.5, 2, 3, 4, 6, 10)
                   if min(speeds) / 1.25 <= t <= max(speeds) * 1.25])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set(xlabel="speed-up over dense, batch 32, base-size LXMERT on the CPU (fp32)",
           ylabel=f"retrained {reference['valid_split']} accuracy (%)",
           title=f"{reference['experiment']}: accuracy against measured speed-up (labels: level %)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def points_table(points: list[Point], reference: dict, dense_ms: float, header: str) -> str:
    """The Markdown table of the picture's points."""
    qo, qo_label = question_only(reference)
    lines = [f"# {reference['experiment']}: accuracy against measured speed-up", "", header, "",
             ("| granularity | mode | level % | measured sparsity % | accuracy (mean ± std) | base structure | "
              "base latency batch 32 (ms) | speed-up |"), "|" + "---|" * 8,
             f"| dense | - | 0 | 0 | {reference['dense']['accuracy']['mean']:.2f} | - | {dense_ms:.1f} | 1.00 |"]
    for p in points:
        latency = "-" if p.latency is None else f"{p.latency:.1f}"
        speed = "1.0 (no CPU kernel; 2:4 needs CUDA)" if p.variant is None else f"{p.speedup:.2f}"
        lines.append(f"| {p.series} | {p.mode} | {100 * p.level:g} | {p.measured:.2f} | {mean_std(p.accuracy)} | "
                     f"{p.structure or '-'} | {latency} | {speed} |")
    lines += ["", (f"{qo_label}: {'-' if qo is None else f'{qo:.2f}'} %. Latency of each point at base size: "
                   f"weights (dense kernels) the masked model at {100 * UNSTRUCTURED:g} % (a mask changes no "
                   "kernel); weights (CSR) CSR weights at the level's target sparsity (global magnitude mask on the "
                   "random base weights); heads / neurons the compact model keeping, in every module of a role, the "
                   "fraction of units the embedded tickets kept in that role (base structure: units kept per module; "
                   f"{ROLE_LEGEND}); N:M none.")]
    return "\n".join(lines) + "\n"


def write_picture(points: list[Point], reference: dict, dense_ms: float, results: Path, header: str) -> None:
    """<results>/accuracy_vs_speedup.png and .md, written atomically."""
    plot_points(points, reference, results / "accuracy_vs_speedup.png")
    write_text(results / "accuracy_vs_speedup.md", points_table(points, reference, dense_ms, header))
    print(f"wrote {results / 'accuracy_vs_speedup.png'} and {results / 'accuracy_vs_speedup.md'}")


# -- docs/PERFORMANCE.md ---------------------------------------------------------------------------------------

def replace_section(doc: Path, text: str) -> None:
    """Replace the text between the markers (append it with them the first time); written atomically."""
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    start, end = old.find(BEGIN), old.find(END)
    if start >= 0 and end > start:
        new = old[:start] + block + old[end + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    write_text(doc, new)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed batch-32 forwards per table row (batch 1: 4x)")
    parser.add_argument("--picture-reps", type=int, default=3, help="most batch-32 forwards per structure that only "
                        f"the accuracy picture needs (none begun after {PICTURE_BUDGET_S:g} s of them)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads "
                        "(default: every core this process may use)")
    parser.add_argument("--levels", default=",".join(f"{x:g}" for x in LEVELS),
                        help="fractions of heads / neurons removed in the table")
    parser.add_argument("--results", type=Path, default=Path("result/embedded"), help="study A's result folder")
    parser.add_argument("--models", type=Path, default=None, help="its models folder (default models/<name>)")
    parser.add_argument("--quick", action="store_true", help=f"trial run: levels {QUICK_LEVELS}, 2 reps")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/PERFORMANCE.md")
    args = parser.parse_args()
    args.levels = QUICK_LEVELS if args.quick else tuple(float(x) for x in args.levels.split(","))
    if args.quick:
        args.reps, args.picture_reps = 2, min(args.picture_reps, 2)
    args.models = args.models or Path("models") / args.results.name
    return args


def cuda_rows(bench: Bench, reps: int) -> list[list[str]]:
    """The 2:4 rows: measured where CUDA is available, else recorded as not run."""
    if not torch.cuda.is_available():
        return [["2:4 semi-structured", "-", "-", "-", "not run: needs CUDA (no device lent)", "-", "-"]]
    try:
        return semi_structured_rows(bench, reps)
    except Exception as e:  # the untested path must not lose the CPU figures
        return [["2:4 semi-structured", "-", "-", "-", f"failed: {type(e).__name__}: {e}", "-", "-"]]


def table_rows(bench: Bench, table: list[Variant], timings: dict, memory: dict, dense_ms: float) -> list[list[str]]:
    rows = []
    for v in table:
        t, peak = timings[v], memory.get(v)
        rows.append([bench.label(v), f"{t['values'] / 1e6:.1f}", f"{t['bytes'] / 1e6:.0f}",
                     "not measured" if peak is None else f"{peak:.0f}", cell(t["b1"]), cell(t["b32"]),
                     f"{dense_ms / statistics.median(t['b32']):.2f}"])
    return rows


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == WORKER:
        memory_worker(json.loads(sys.argv[2]), int(sys.argv[3]))
        return
    args = parse_args()
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    print(f"{machine()}; building the base-size model", flush=True)
    bench = Bench()
    table = [Variant("dense")] + [bench.uniform(k, x) for k in ("heads", "neurons") for x in args.levels] \
        + [Variant("masked", UNSTRUCTURED), Variant("csr", UNSTRUCTURED)]
    points, reference, _ = read_studies(bench, args.results, args.models)

    print(f"timing {len(table)} table rows ({args.reps} reps at batch 32, {4 * args.reps} at batch 1)", flush=True)
    timings = {v: time_variant(bench, v, args.reps, True) for v in table}
    extra = list(dict.fromkeys(p.variant for p in points if p.variant is not None and p.variant not in timings))
    print(f"timing {len(extra)} more structures for the accuracy picture (up to {args.picture_reps} reps at "
          "batch 32)", flush=True)
    timings.update({v: time_variant(bench, v, args.picture_reps, False) for v in extra})
    rows_cuda = cuda_rows(bench, args.reps)
    print("measuring the forward's peak memory in a fresh process", flush=True)
    memory = measure_memory(table, args.threads)

    dense_ms = statistics.median(timings[Variant("dense")]["b32"])
    for p in points:
        p.latency = None if p.variant is None else statistics.median(timings[p.variant]["b32"])
        p.speedup = 1.0 if p.variant is None else dense_ms / p.latency
    cmd = ("python -m bench.inference " + " ".join(sys.argv[1:])).strip()
    header = (f"Machine: {machine()}. Date: {datetime.date.today().isoformat()}. Command: `{cmd}`. Load average "
              f"(1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}; "
              f"{time.perf_counter() - started:.0f} s.")
    if points and reference is not None:
        write_picture(points, reference, dense_ms, args.results, header)
    else:
        print(f"no lottery*.json with points under {args.results}: no accuracy picture")
    text = section(header, table_rows(bench, table, timings, memory, dense_ms) + rows_cuda, args.reps, args.results)
    print(text)
    if not args.no_docs:
        replace_section(DOC, text)
        print(f"replaced the bench.inference section of {DOC}")


def section(header: str, rows: list[list[str]], reps: int, results: Path) -> str:
    """The docs section: machine line, latency and memory table, how it was measured."""
    cols = ["model", "parameters (M)", "weights (MB)", "forward peak RSS increase, batch 32 (MB)",
            "batch-1 ms, median [min-max]", "batch-32 ms, median [min-max]", "speed-up vs dense, batch 32"]
    lines = ["### Inference latency and memory at base size (CPU, fp32)", "", header, "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", (f"LXMERT base shapes, random weights (seed 0), eval, `torch.no_grad()`; {reps} timed forwards at "
              f"batch 32 after one warm-up, {4 * reps} at batch 1 after two. Compact rows: the same fraction of the "
              "heads (neurons) of every attention module (feed-forward block) removed and the matrices cut "
              "(`prune.structure.shrink`); each was checked against its masked model (logits within 1e-4). Masked "
              "and CSR rows: global magnitude mask over every Linear weight of the encoder and pooler; CSR stores "
              "only the kept weights (`CSRLinear`: `torch.addmm` with a sparse CSR weight) and parameters (M) counts "
              "them. Peak RSS: one batch-32 forward in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536` "
              "(high-water mark reset before it); it includes every layer's hidden states, which transformers' "
              "`LxmertEncoder.forward` keeps for its outputs whatever `output_hidden_states` says. The accuracy "
              f"each structure keeps on the embedded benchmark: `{results}/accuracy_vs_speedup.md` (same command). "
              "Script: `bench/inference.py`.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
