"""Training throughput and peak memory of the VQA model on random inputs.

    python -m bench.training [--sizes tiny,base] [--steps N] [--batch-size B] [--threads T] [--no-append]

One step is what the trainer does per batch: forward, BCE (summed over answers, mean over the batch),
backward, gradient clipping at 5.0, fused AdamW step (weight decay on matrices only), zero_grad.
Variants: CPU fp32; on CUDA fp32 and bf16 autocast, each eager and under torch.compile.
Overheads against the plain step (same device, precision and batch):
  - "AdamW unfused": the same step with AdamW's per-tensor Python loop (what the trainer used on CPU before
    2026-12-06), to show what the fused kernel saves;
  - "mask enforcer": fixed masks at 50 % sparsity on the prunable set, pruned gradients zeroed before
    clipping and pruned weights zeroed after the optimizer step (lxmert.prune.masks.MaskEnforcer, as the trainer);
  - "mask training": lxmert.prune.learned.LearnedMasks at 50 % (weights frozen, scores + head trained, as
    study B's stage 2); the cost of one reset_thresholds() call is reported apart.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PeakRSS, append, rss_gib  # noqa: E402
from lxmert.core.config import ModelConfig  # noqa: E402
from lxmert.modeling.losses import BCELoss  # noqa: E402
from lxmert.modeling.vqa import build_model  # noqa: E402
from lxmert.prune.learned import LearnedMasks, top_k_mask  # noqa: E402
from lxmert.prune.masks import MaskEnforcer, apply_mask  # noqa: E402
from lxmert.prune.prunable import prunable_tensors  # noqa: E402
from lxmert.train.optimizers import adamw, param_groups  # noqa: E402

CLIP = 5.0


@dataclass(frozen=True)
class Size:
    name: str
    model: ModelConfig
    vocab: int
    regions: int
    feat_dim: int
    tokens: int
    answers: int
    cpu_batch: int
    gpu_batch: int
    cpu_steps: int
    gpu_steps: int


SIZES = {
    # run/configs/embedded.yaml: the embedded benchmark (39-token vocabulary, 20 answers)
    "tiny": Size("tiny", ModelConfig(hidden_size=128, num_attention_heads=4, intermediate_size=256, l_layers=2,
                                     x_layers=2, r_layers=2, dropout=0.1),
                 vocab=39, regions=8, feat_dim=64, tokens=20, answers=20, cpu_batch=32, gpu_batch=256,
                 cpu_steps=40, gpu_steps=30),
    # LXMERT base on VQA v2: 36 detector regions x 2048, 20 tokens, 3,129 answers
    "base": Size("base", ModelConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, l_layers=9,
                                     x_layers=5, r_layers=5, dropout=0.1),
                 vocab=30522, regions=36, feat_dim=2048, tokens=20, answers=3129, cpu_batch=8, gpu_batch=128,
                 cpu_steps=4, gpu_steps=20),
}


def random_batch(size: Size, batch: int, device: torch.device, gen: torch.Generator) -> dict:
    """Inputs shaped like a collated batch of lxmert.data.datasets.VQADataset."""
    x1y1 = torch.rand(batch, size.regions, 2, generator=gen) * 0.5
    wh = torch.rand(batch, size.regions, 2, generator=gen) * 0.5
    target = torch.zeros(batch, size.answers)
    idx = torch.randint(0, size.answers, (batch, 3), generator=gen)
    target.scatter_(1, idx, torch.tensor([1.0, 0.6, 0.3]).expand(batch, 3))
    out = {"input_ids": torch.randint(5, size.vocab, (batch, size.tokens), generator=gen),
           "attention_mask": torch.ones(batch, size.tokens, dtype=torch.long),
           "visual_feats": torch.randn(batch, size.regions, size.feat_dim, generator=gen).abs(),
           "visual_pos": torch.cat([x1y1, x1y1 + wh], -1), "target": target,
           "qtype": torch.zeros(batch, dtype=torch.long)}
    return {k: v.to(device) for k, v in out.items()}


def make_model(size: Size, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(size.model, vocab_size=size.vocab, feat_dim=size.feat_dim, num_answers=size.answers).to(device)


def half_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """50 % masks per tensor: the top half by |w| of every prunable tensor kept."""
    out = {}
    for t in prunable_tensors(model):
        w = model.get_parameter(t.name).detach()
        out[t.name] = top_k_mask(w.abs(), w.numel() // 2)
    return out


class Step:
    """One training step of a model; `variant` is plain, unfused (plain with AdamW's per-tensor loop instead of
    the fused kernel the trainer uses), enforcer or masktrain."""

    def __init__(self, size: Size, device: torch.device, precision: str, compile_: bool, variant: str):
        self.device, self.precision = device, precision
        self.model = make_model(size, device)
        self.loss = BCELoss()
        self.enforcer = None
        self.masks = None
        if variant == "enforcer":
            mask = half_masks(self.model)
            apply_mask(self.model, mask)
            self.enforcer = MaskEnforcer(self.model, mask)
            named = list(self.model.named_parameters())
        elif variant == "masktrain":
            self.masks = LearnedMasks(self.model, 0.5)
            ids = {id(p) for p in self.masks.scores() + list(self.model.head.parameters())}
            named = [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]
        else:
            named = list(self.model.named_parameters())
        self.params = [p for _, p in named]
        if variant == "unfused":
            self.optimizer = torch.optim.AdamW(param_groups(named, 0.01), lr=1e-5, foreach=False, fused=False)
        else:
            self.optimizer = adamw(param_groups(named, 0.01), 1e-5, device)
        self.model.train()
        self.forward = torch.compile(self._forward) if compile_ else self._forward

    def _forward(self, batch: dict) -> torch.Tensor:
        logits, pooled = self.model(batch)
        return self.loss(logits.float(), batch["target"], pooled.float(), batch["qtype"])

    def autocast(self):
        if self.device.type == "cuda" and self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, batch: dict) -> float:
        with self.autocast():
            loss = self.forward(batch)
        loss.backward()
        if self.enforcer is not None:
            self.enforcer.zero_grads()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.enforcer is not None:
            self.enforcer.apply()
        return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_group(size: Size, device: torch.device, precision: str, compile_: bool, variants: tuple,
                  batch: int, steps: int, warmup: int) -> dict[str, dict]:
    """Build every variant (memory measured while building and warming up), then time them round-robin,
    one step each in turn, so that load from other jobs hits all variants alike."""
    gen = torch.Generator().manual_seed(1)
    batches = [random_batch(size, batch, device, gen) for _ in range(2)]
    built, out = {}, {}
    for variant in variants:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        rss_before = rss_gib()
        with PeakRSS() as mem:
            step = Step(size, device, precision, compile_, variant)
            for i in range(warmup):
                step(batches[i % 2])
            sync(device)
        built[variant] = step
        out[variant] = {"rss": mem.peak - rss_before if device.type == "cpu" else None,
                        "cuda": (torch.cuda.max_memory_allocated() - cuda_before) / 2**30
                        if device.type == "cuda" else None, "times": []}
    for i in range(steps):
        for variant, step in built.items():
            start = time.perf_counter()
            loss = step(batches[i % 2])
            float(loss.detach())
            sync(device)
            out[variant]["times"].append(time.perf_counter() - start)
    for variant, step in built.items():
        r = out[variant]
        r["reset_s"] = ""
        if step.masks is not None:
            start = time.perf_counter()
            step.masks.reset_thresholds()
            sync(device)
            r["reset_s"] = f"{time.perf_counter() - start:.3f}"
        median = statistics.median(r["times"])
        r.update(samples_s=batch / median, step_ms=1000 * median, mean_ms=1000 * statistics.mean(r["times"]))
    del built, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,base", help="comma-separated: tiny, base")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement (default: tiny 40 CPU / 30 CUDA, base 4 CPU / 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 3 CUDA; "
                                                                 "compile adds 2)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: tiny 32 CPU / 256 CUDA, base 8 CPU / 128 CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurements")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to docs/PERFORMANCE.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [SIZES[s.strip()] for s in args.sizes.split(",") if s.strip()]
    load_start = os.getloadavg()[0]
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no GPU: the CUDA variants (fp32/bf16, eager/compiled) are skipped")
    rows = []
    for size in sizes:
        setups = []
        if not args.no_cpu:
            setups.append((torch.device("cpu"), "fp32", False))
        if cuda:
            setups += [(torch.device("cuda"), p, c) for p in ("fp32", "bf16") for c in (False, True)]
        for device, precision, compile_ in setups:
            gpu = device.type == "cuda"
            batch = args.batch_size or (size.gpu_batch if gpu else size.cpu_batch)
            steps = args.steps or (size.gpu_steps if gpu else size.cpu_steps)
            warmup = (args.warmup if args.warmup is not None else (3 if gpu else 1)) + (2 if compile_ else 0)
            variants = ("plain", "unfused", "enforcer", "masktrain") if not compile_ else ("plain",)
            results = measure_group(size, device, precision, compile_, variants, batch, steps, warmup)
            plain = results["plain"]
            for variant, r in results.items():
                overhead = "" if variant == "plain" else f"{100 * (r['step_ms'] / plain['step_ms'] - 1):+.1f}"
                label = f"{device.type} {precision}{' compiled' if compile_ else ''}"
                row = [size.name, label, {"plain": "plain step", "unfused": "plain, AdamW unfused (loop)",
                                          "enforcer": "+ mask enforcer (50 %)",
                                          "masktrain": "mask training (50 %)"}[variant],
                       batch, steps, f"{r['samples_s']:.1f}", f"{r['step_ms']:.1f}", f"{r['mean_ms']:.1f}", overhead,
                       f"{r['rss']:.2f}" if r["rss"] is not None else "-",
                       f"{r['cuda']:.2f}" if r["cuda"] is not None else "-", r["reset_s"] or "-"]
                print(" | ".join(str(c) for c in row), flush=True)
                rows.append(row)
    load_end = os.getloadavg()[0]
    shared = max(load_start, load_end) > 0.5
    cmd = "python -m bench.training " + " ".join(sys.argv[1:])
    notes = (f"Command: `{cmd.strip()}`. Step = forward + BCE + backward + clip + AdamW step (+ mask work); "
             f"each step timed alone (loss read back, CUDA synchronised), samples/s = batch / median step time. "
             f"Overhead = step time relative to the plain step of the same row group. Variants of a row group "
             f"are timed round-robin (one step of each in turn). Peak RSS growth and CUDA peak "
             f"(max_memory_allocated above the level before) cover building the variant and its warm-up "
             f"steps. Load average (1 min) at start {load_start:.2f}, at end "
             f"{load_end:.2f}: {'the machine was shared with other jobs, so CPU figures are pessimistic.' if shared else 'the machine was otherwise idle.'}"
             f"{'' if cuda else ' No GPU: CUDA rows skipped.'}")
    header = ["size", "device / precision", "variant", "batch", "timed steps", "samples/s", "median ms/step", "mean ms/step",
              "overhead %", "peak RSS growth (GiB)", "CUDA peak (GiB)", "reset_thresholds (s)"]
    if args.no_append:
        print("\n".join(" | ".join(str(c) for c in r) for r in [header] + rows))
        print(notes)
    else:
        append("Training throughput (random inputs)", header, rows, notes)


if __name__ == "__main__":
    main()
