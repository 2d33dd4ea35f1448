"""The pruning step (threshold, masks, apply) on a base-size LXMERT: ours vs torch.nn.utils.prune.

    python -m bench.pruning [--torch-prune] [--threads T]

Base config: hidden 768, 9/5/5 layers, 2048-d features, 3,129 answers (about 184 M prunable weights).
The torch.nn.utils.prune comparison takes ~30 s and ~12 GB, so it only runs with --torch-prune.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PeakRSS, append  # noqa: E402
from lxmert.core.config import ModelConfig  # noqa: E402
from lxmert.modeling.vqa import build_model  # noqa: E402
from lxmert.prune.magnitude import prune  # noqa: E402
from lxmert.prune.masks import apply_mask, full_mask, measure_weights  # noqa: E402
from lxmert.prune.prunable import prunable_tensors  # noqa: E402

BASE = ModelConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, l_layers=9, x_layers=5,
                   r_layers=5, dropout=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--torch-prune", action="store_true", help="also time torch.nn.utils.prune.global_unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=5, help="runs per mode (median and min reported)")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to docs/PERFORMANCE.md")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    model = build_model(BASE, vocab_size=30522, feat_dim=2048, num_answers=3129)
    prunable = prunable_tensors(model)
    n = sum(model.get_parameter(t.name).numel() for t in prunable)
    weights_gib = 4 * n / 2**30
    original = {t.name: model.get_parameter(t.name).detach().clone() for t in prunable}
    rows = []
    for mode in ("low_magnitude", "high_magnitude", "random"):
        times, peaks = [], []
        for _ in range(args.repeat):
            with torch.no_grad():
                for name, w in original.items():
                    model.get_parameter(name).copy_(w)
            current = full_mask(model, prunable)
            with PeakRSS() as mem:
                start = time.perf_counter()
                mask = prune(mode, model, prunable, current, args.sparsity)
                apply_mask(model, mask)
                times.append(time.perf_counter() - start)
            peaks.append(mem.extra_gib)
            del mask, current
        measured = measure_weights(model, prunable)["overall"]
        rows.append([f"ours, {mode}", f"{n / 1e6:.1f} M", f"{statistics.median(times):.2f}", f"{min(times):.2f}",
                     f"{max(peaks):.2f}", f"{measured:.4f}"])
        print(" | ".join(rows[-1]), flush=True)
    with torch.no_grad():
        for name, w in original.items():
            model.get_parameter(name).copy_(w)
    del original
    if args.torch_prune:
        import torch.nn.utils.prune as tprune

        params = [(model.get_submodule(t.name.rsplit(".", 1)[0]), "weight") for t in prunable]
        with PeakRSS() as mem:
            start = time.perf_counter()
            tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=args.sparsity)
            for module, name in params:
                tprune.remove(module, name)
            seconds = time.perf_counter() - start
        measured = measure_weights(model, prunable)["overall"]
        rows.append(["torch.nn.utils.prune.global_unstructured (L1), once", f"{n / 1e6:.1f} M", f"{seconds:.2f}",
                     f"{seconds:.2f}",
                     f"{mem.extra_gib:.2f}", f"{measured:.4f}"])
    load_end = os.getloadavg()[0]
    cmd = ("python -m bench.pruning " + " ".join(sys.argv[1:])).strip()
    if args.no_append:
        for row in rows:
            print(" | ".join(str(c) for c in row))
        return
    append(f"Pruning step at base size, global scope, target sparsity {100 * args.sparsity:g} %",
           ["method", "prunable weights", "median seconds", "min seconds", "extra peak RSS (GiB)",
            "measured sparsity %"], rows,
           f"Prunable weights in float32: {weights_gib:.2f} GiB; the boolean masks themselves take "
           f"{n / 2**30:.2f} GiB. Seconds = threshold + masks + apply_mask, {args.repeat} runs per mode "
           f"from the same initial weights. Command: `{cmd}`. Load average (1 min) at start {load_start:.2f}, at end "
           f"{load_end:.2f}" + (": the machine was shared with other jobs." if max(load_start, load_end) > 0.5
                                else "."))


if __name__ == "__main__":
    main()
