"""VQA soft accuracy: the score of the predicted answer in the question's soft label, in percent."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import torch

from ..core import distributed as dist
from ..data.datasets import Inputs, SliceSampler, VQADataset, loader


def autocast(device: torch.device, precision: str):
    """Autocast context for CUDA in bf16/fp16; fp32 (and every CPU run) runs without it."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: VQADataset, batch_size: int, device: torch.device,
            precision: str = "fp32", num_workers: int = 0) -> np.ndarray:
    """Predicted answer index of every question, read through the DataLoader like training (workers, pinned
    memory); under torchrun each rank does a slice. The predictions stay on the device until the end: one
    copy to the host per split, not one per batch."""
    was_training = model.training
    model.eval()
    n = len(dataset)
    per = -(-n // dist.world())
    lo, hi = dist.rank() * per, min(n, (dist.rank() + 1) * per)
    batches = loader(Inputs(dataset), SliceSampler(lo, hi, batch_size), num_workers, device.type == "cuda")
    preds = []
    for batch in batches:
        with autocast(device, precision):
            logits, _ = model(to_device(batch, device))
        preds.append(logits.argmax(1))
    model.train(was_training)
    mine = torch.cat(preds).cpu().numpy() if preds else np.zeros(0, np.int64)
    return np.concatenate(dist.gather(mine))


def scores_of(dataset: VQADataset, preds: np.ndarray) -> np.ndarray:
    """Soft score of each predicted answer (0 where the answer is not in the question's label)."""
    sp = dataset.split
    row = np.repeat(np.arange(len(preds)), np.diff(sp.label_ptr))  # question of each label entry
    hit = sp.label_idx == preds[row]  # a question's label lists each answer once
    out = np.zeros(len(preds), np.float64)
    out[row[hit]] = sp.label_score[hit]
    return out


def accuracy(dataset: VQADataset, preds: np.ndarray) -> dict[str, float]:
    """Overall and per-answer-type accuracy in percent, plus the question count."""
    scores = scores_of(dataset, preds)
    by_type: dict[str, list[float]] = defaultdict(list)
    for t, s in zip(dataset.split.answer_types, scores):
        by_type[t].append(s)
    out = {"overall": round(100 * float(scores.mean()), 4)}
    out.update({t: round(100 * float(np.mean(v)), 4) for t, v in sorted(by_type.items())})
    out["questions"] = len(scores)
    return out


def evaluate(model, dataset: VQADataset, batch_size: int, device, precision: str = "fp32",
             num_workers: int = 0) -> dict[str, float]:
    return accuracy(dataset, predict(model, dataset, batch_size, device, precision, num_workers))


def predictions_json(dataset: VQADataset, preds: np.ndarray, label2ans: list[str]) -> list[dict]:
    """[{"question_id", "answer"}] (the EvalAI format), question ids as the question file gives them."""
    return [{"question_id": q, "answer": label2ans[p]} for q, p in zip(dataset.split.question_ids, preds)]
