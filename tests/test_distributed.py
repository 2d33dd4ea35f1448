"""Two CPU processes under torchrun (gloo) give the single-process results."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import cli_env, comparable, tiny_yaml

from lxmert.core.files import load_tensors
from lxmert.prune.masks import load_mask

RUNS = ["seed_0/init.safetensors", "seed_0/dense/run/final/model.safetensors", "seed_0/dense/run/best/model.safetensors",
        "seed_0/iterative_global/low_magnitude/level_30/run/final/model.safetensors"]


def test_two_ranks_match_one_process(lottery_run, embedded_root, tmp_path):
    reference, _, ref_result = lottery_run
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root,
                       extra=["lottery.modes=[low_magnitude]", "lottery.levels=[0.3]"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lxmert", "lottery", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("seed 0 dense bce | epoch 1/1") == 1, "only rank 0 reports"
    assert proc.stdout.count("randomly initialised") == 1, "said once, by rank 0 (rank 1 logs warnings only)"

    ft, ref_ft = (json.loads((d / "result" / "tiny" / "finetune.json").read_text()) for d in (tmp_path, reference))
    for key in ("final", "best", "blind", "tests"):
        assert ft["seeds"]["0"][key] == ref_ft["seeds"]["0"][key], key
    losses = [e["loss"] for e in ft["seeds"]["0"]["epochs"]]
    ref_losses = [e["loss"] for e in ref_ft["seeds"]["0"]["epochs"]]
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5)

    rows = json.loads((tmp_path / "result" / "tiny" / "lottery.json").read_text())["rows"]
    assert comparable(rows) == comparable(ref_result["rows"][:1])

    models, ref_models = tmp_path / "models" / "tiny", reference / "models" / "tiny"
    for rel in RUNS:
        a, b = load_tensors(models / rel), load_tensors(ref_models / rel)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-5, f"{rel}: weights differ by {worst}"
    level = "seed_0/iterative_global/low_magnitude/level_30/mask.safetensors"
    mask, ref_mask = load_mask(models / level)[0], load_mask(ref_models / level)[0]
    assert all(torch.equal(mask[k], ref_mask[k]) for k in ref_mask)
    assert not [p for p in tmp_path.rglob("*") if ".lxmert-" in p.name]


def test_a_checkpoint_resumes_with_another_number_of_ranks(embedded_root, tmp_path):
    """A run killed after its first epoch's checkpoint (written with every rank's RNG state) resumes with
    another number of ranks and ends: two ranks -> one process, and one process -> two ranks (a rank the
    checkpoint did not have starts from a state seeded from the seed, the run and its rank)."""
    from lxmert.core.files import load_state

    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root, epochs=2, extra=["train.batch_size=80"])
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lxmert", "finetune", "--config", str(config)]
    one = [sys.executable, "-m", "lxmert", "finetune", "--config", str(config)]
    for first, then, ranks in ((two, one, 2), (one, two, 1)):
        work = tmp_path / f"from_{ranks}"
        work.mkdir()
        killed = subprocess.run(first, cwd=work, env={**cli_env(), "LXMERT_FAULT_ON": "dense/run/final"},
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode != 0
        [ckpt] = (work / "models/tiny/seed_0/dense/run").glob("ckpt-*")
        assert len(load_state(ckpt / "trainer.pt")["rngs"]) == ranks
        done = subprocess.run(then, cwd=work, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "resumed from" in done.stdout and "at epoch 2, step 5" in done.stdout
        summary = json.loads((work / "models/tiny/seed_0/dense/run/final/summary.json").read_text())
        assert [r["epoch"] for r in summary["history"]] == [1, 2] and summary["steps"] == 10
