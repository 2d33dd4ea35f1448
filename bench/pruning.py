"""The pruning step (threshold, masks, apply) on a base-size LXMERT: ours vs torch.nn.utils.prune.

    python bench/pruning.py [--torch-prune]

Base config: hidden 768, 9/5/5 layers, 2048-d features, 3,129 answers (about 184 M prunable weights).
The torch.nn.utils.prune comparison takes ~30 s and ~12 GB, so it only runs with --torch-prune.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PeakRSS, append  # noqa: E402
from lxmert.config import ModelConfig  # noqa: E402
from lxmert.masks import apply_mask, full_mask, measure_weights  # noqa: E402
from lxmert.modeling import build_model, prunable_tensors  # noqa: E402
from lxmert.pruning import prune  # noqa: E402

BASE = ModelConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, l_layers=9, x_layers=5,
                   r_layers=5, dropout=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--torch-prune", action="store_true", help="also time torch.nn.utils.prune.global_unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(BASE, vocab_size=30522, feat_dim=2048, num_answers=3129)
    prunable = prunable_tensors(model)
    n = sum(model.get_parameter(t.name).numel() for t in prunable)
    weights_gib = 4 * n / 2**30
    rows = []
    for mode in ("low_magnitude", "high_magnitude", "random"):
        current = full_mask(model, prunable)
        with PeakRSS() as mem:
            start = time.perf_counter()
            mask = prune(mode, model, prunable, current, args.sparsity)
            apply_mask(model, mask)
            seconds = time.perf_counter() - start
        measured = measure_weights(model, prunable)["overall"]
        rows.append([f"ours, {mode}", f"{n / 1e6:.1f} M", f"{seconds:.2f}", f"{mem.extra_gib:.2f}",
                     f"{measured:.4f}"])
        torch.manual_seed(0)
        model = build_model(BASE, vocab_size=30522, feat_dim=2048, num_answers=3129)
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
        rows.append(["torch.nn.utils.prune.global_unstructured (L1)", f"{n / 1e6:.1f} M", f"{seconds:.2f}",
                     f"{mem.extra_gib:.2f}", f"{measured:.4f}"])
    append(f"Pruning step at base size, global scope, target sparsity {100 * args.sparsity:g} %",
           ["method", "prunable weights", "seconds", "extra peak RSS (GiB)", "measured sparsity %"], rows,
           f"Prunable weights in float32: {weights_gib:.2f} GiB; the boolean masks themselves take "
           f"{n / 2**30:.2f} GiB. Command: `python bench/pruning.py{' --torch-prune' if args.torch_prune else ''}`.")


if __name__ == "__main__":
    main()
