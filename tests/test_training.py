"""The training loop: masks stay enforced, runs repeat exactly, resumption is exact, divergence stops."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from lxmert.core.errors import InputError, TrainingDiverged
from lxmert.core.files import load_state, load_tensors, save_tensors
from lxmert.core.paths import Run
from lxmert.modeling.vqa import build_model
from lxmert.prune.magnitude import prune
from lxmert.prune.masks import full_mask
from lxmert.prune.prunable import prunable_tensors
from lxmert.studies.context import Context
from lxmert.train.checkpoints import check_compatible, check_masked, load_weights, run_summary
from lxmert.train.optimizers import adamw
from lxmert.train.trainer import RunSpec, Schedule, Trainer

STEPS_PER_EPOCH = 10  # 400 training questions, batch 40


class Interrupt(Exception):
    pass


def _raise_at(step_to_fail: int):
    def after_step(step: int) -> None:
        if step == step_to_fail:
            raise Interrupt(step)
    return after_step


@pytest.fixture(scope="module")
def ctx(embedded_root, tiny_data):
    """Dropout on, so exact repetition also needs the RNG state to be restored."""
    return Context(tiny_config(embedded_root, extra=["model.dropout=0.1", "train.weight_decay=0.1"]), tiny_data)


def _spec(ctx, folder, model, epochs, tag="test", lr=None, seed=0, cfg=None, **kwargs) -> RunSpec:
    """A run of the train section's schedule with `epochs` (and `lr`) of its own."""
    schedule = Schedule.of(cfg or ctx.cfg, epochs=epochs, **({"lr": lr} if lr else {}))
    return RunSpec(run=Run(folder), seed=seed, tag=tag, loss=ctx.loss("bce", model, 0), schedule=schedule, **kwargs)


def _fit(ctx, folder, epochs=2, seed=0, **spec_kwargs):
    model = ctx.new_model(seed)
    spec = _spec(ctx, folder, model, epochs, seed=seed, **spec_kwargs)
    return model, Trainer(model, ctx.data.train, ctx.data.valid, spec).fit()


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _same_weights_as_file(model: torch.nn.Module, path) -> bool:
    saved, own = load_tensors(path), model.state_dict()
    return saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in own)


@pytest.fixture(scope="module")
def interrupted(ctx, tmp_path_factory):
    """A run stopped in its second epoch: its folder holds the checkpoint of the first epoch's end."""
    folder = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Interrupt):
        _fit(ctx, folder, after_step=_raise_at(STEPS_PER_EPOCH + 3))
    return folder


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(ctx, tmp_path_factory):
    """An uninterrupted two-epoch run."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    model, summary = _fit(ctx, folder)
    return folder, model, summary


def test_run_writes_checkpoints_and_summary(reference):
    folder, model, summary = reference
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    assert [r["step"] for r in summary["history"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["final"] == summary["history"][-1]["valid"]
    assert summary["final"]["questions"] == 150 and 0 <= summary["final"]["overall"] <= 100
    for name in ("final/model.safetensors", "final/summary.json", "best/model.safetensors"):
        assert (folder / name).exists(), name
    assert run_summary(Run(folder)) == summary
    assert Run(folder).checkpoints() == [], "a finished run keeps no optimizer state"
    assert _same_weights_as_file(model, folder / "final" / "model.safetensors")


def test_pruned_weights_stay_exactly_zero(ctx, tmp_path):
    model = ctx.new_model(0)
    prunable = prunable_tensors(model)
    mask = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.5, "global")
    pruned_count = sum(int((~m).sum()) for m in mask.values())
    before = {t.name: model.get_parameter(t.name).detach().clone() for t in prunable}
    zeros_seen = []

    def check(step: int) -> None:
        zeros = sum(int((model.get_parameter(n)[~m] == 0).sum()) for n, m in mask.items())
        zeros_seen.append(zeros)

    spec = _spec(ctx, tmp_path / "run", model, 1, masks=mask, after_step=check, tag="masked")
    Trainer(model, ctx.data.train, ctx.data.valid, spec).fit()
    assert zeros_seen == [pruned_count] * STEPS_PER_EPOCH
    moved = sum(int((model.get_parameter(n)[m] != before[n][m]).sum()) for n, m in mask.items())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values()), "the kept weights must train"

    # Without enforcement the same run regrows the pruned weights (AdamW momentum + weight decay).
    regrown = ctx.new_model(0)
    for name, keep in mask.items():
        with torch.no_grad():
            regrown.get_parameter(name).masked_fill_(~keep, 0)
    spec = _spec(ctx, tmp_path / "free", regrown, 1, tag="free")
    Trainer(regrown, ctx.data.train, ctx.data.valid, spec).fit()
    assert sum(int((regrown.get_parameter(n)[~m] == 0).sum()) for n, m in mask.items()) < pruned_count // 2


def test_fixed_seed_run_repeats_exactly(ctx, reference, tmp_path):
    _, model, summary = reference
    again, summary_again = _fit(ctx, tmp_path / "run")
    assert _same_weights(model, again)
    assert _without_seconds(summary_again["history"]) == _without_seconds(summary["history"])
    other, _ = _fit(ctx, tmp_path / "other", seed=1)
    assert not _same_weights(model, other)


@pytest.mark.parametrize("save_every, fail_at, resumed_at", [(0, STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH),
                                                              (4, STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH + 2)])
def test_interrupted_run_resumes_exactly(ctx, reference, tmp_path, save_every, fail_at, resumed_at):
    _, model, summary = reference
    folder = tmp_path / "run"
    ctx.cfg.train.save_every_steps = save_every
    try:
        with pytest.raises(Interrupt):
            _fit(ctx, folder, after_step=_raise_at(fail_at))
        assert not (folder / "final").exists()
        [newest] = Run(folder).checkpoints()
        state = load_state(newest / "trainer.pt")
        assert state["step"] == resumed_at and len(state["history"]) == 1
        steps = []
        resumed, resumed_summary = _fit(ctx, folder, after_step=steps.append)
    finally:
        ctx.cfg.train.save_every_steps = 0
    assert steps == list(range(resumed_at + 1, 2 * STEPS_PER_EPOCH + 1)), "resumed from the checkpoint"
    assert _same_weights(model, resumed)
    assert _without_seconds(resumed_summary["history"]) == _without_seconds(summary["history"])
    rerun, rerun_summary = _fit(ctx, folder, after_step=steps.append)
    assert rerun_summary == resumed_summary and steps[-1] == 2 * STEPS_PER_EPOCH, "a finished run is not redone"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ctx, tmp_path):
    folder = tmp_path / "run"
    model = ctx.new_model(0)

    def poison(step: int) -> None:
        if step == STEPS_PER_EPOCH + 2:
            with torch.no_grad():
                model.head[3].bias.fill_(float("nan"))

    spec = _spec(ctx, folder, model, 2, after_step=poison, tag="poisoned")
    with pytest.raises(TrainingDiverged, match=rf"at step {STEPS_PER_EPOCH + 3} \(epoch 2\)") as info:
        Trainer(model, ctx.data.train, ctx.data.valid, spec).fit()
    [newest] = Run(folder).checkpoints()
    assert f"last good checkpoint: {newest} (rerun resumes from it)" in str(info.value)
    assert load_state(newest / "trainer.pt")["step"] == STEPS_PER_EPOCH
    weights = load_tensors(newest / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (folder / "final").exists()


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(ctx, tmp_path):
    model = ctx.new_model(0)

    def poison(step: int) -> None:
        with torch.no_grad():
            model.head[3].bias.fill_(float("nan"))

    spec = _spec(ctx, tmp_path / "run", model, 2, after_step=poison, tag="poisoned")
    with pytest.raises(TrainingDiverged, match=r"at step 2 \(epoch 1\); no checkpoint was written yet"):
        Trainer(model, ctx.data.train, ctx.data.valid, spec).fit()


def test_weights_of_another_config_are_refused(ctx, tiny_data, tmp_path):
    model = ctx.new_model(0)
    path = tmp_path / "model.safetensors"
    save_tensors(path, model.state_dict())
    wider = build_model(tiny_config(ctx.cfg.data.root, extra=["model.hidden_size=48"]).model,
                        len(tiny_data.tokenizer), 16, tiny_data.num_answers)
    with pytest.raises(InputError, match=r"does not match this config: '.*' has shape \(.*32.*\), "
                                         r"this config needs \(.*48.*\)") as info:
        load_weights(wider, path)
    assert str(path) in str(info.value)
    fewer = build_model(ctx.cfg.model, len(tiny_data.tokenizer), 16, tiny_data.num_answers - 3)
    with pytest.raises(InputError, match=rf"'head.3.weight' has shape \({tiny_data.num_answers}, 64\), "
                                         rf"this config needs \({tiny_data.num_answers - 3}, 64\)"):
        load_weights(fewer, path)
    with pytest.raises(InputError, match=r"missing keys \['extra.weight'\], unexpected keys \[\]"):
        check_compatible({**model.state_dict(), "extra.weight": torch.zeros(1)}, model.state_dict(), path)


def test_resume_from_another_config_is_refused(ctx, interrupted, tiny_data, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(interrupted, folder)
    other = Context(tiny_config(ctx.cfg.data.root, extra=["model.intermediate_size=48"]), tiny_data)
    model = other.new_model(0)
    spec = _spec(other, folder, model, 2, lr=1e-3, tag="other")
    with pytest.raises(InputError, match=r"ckpt-0+10-0001-0+/model.safetensors does not match this config: "
                                         r"'model\..*' has shape"):
        Trainer(model, tiny_data.train, tiny_data.valid, spec).fit()


def test_resume_with_another_prunable_set_is_refused(ctx, interrupted, tmp_path):
    """Same shapes, other masked tensors (e.g. lottery.prunable changed): the names tell."""
    folder = tmp_path / "run"
    shutil.copytree(interrupted, folder)
    model = ctx.new_model(0)
    mask = full_mask(model, prunable_tensors(model, ["encoder.embeddings.word_embeddings.weight", "encoder.encoder.*"]))
    spec = _spec(ctx, folder, model, 2, lr=1e-3, masks=mask, tag="m")
    with pytest.raises(InputError, match=r"/trainer.pt was trained with another prunable set than this "
                                         rf"config: 0 masked tensors there, {len(mask)} here; not masked there: "):
        Trainer(model, ctx.data.train, ctx.data.valid, spec).fit()
    check_masked(["a", "b"], ["a", "b"], folder)
    check_masked(["a"], None, folder)
    with pytest.raises(InputError, match=r"not masked there: \[\], not masked here: \['model.embeddings.weight'\]"):
        check_masked(["a"], ["a", "model.embeddings.weight"], folder)


def test_a_split_too_small_for_one_step_is_refused(ctx):
    model = ctx.new_model(0)
    cfg = tiny_config(ctx.cfg.data.root, batch_size=400, extra=["train.grad_accum=2"])
    spec = _spec(ctx, Path("unused"), model, 1, lr=1e-3, cfg=cfg)
    with pytest.raises(InputError, match=r"400 training questions give no optimizer step with "
                                         r"a batch size of 400 over 1 process\(es\) and train.grad_accum=2"):
        Trainer(model, ctx.data.train, ctx.data.valid, spec)


def test_fresh_run_does_not_depend_on_what_the_process_ran_before(ctx, reference, tmp_path):
    """A study that skips finished runs must recompute the others exactly: a fresh run seeds its own RNG."""
    _, ref_model, ref_summary = reference
    model = ctx.new_model(0)
    torch.rand(12345), torch.randn(3, 3)  # what an earlier run in the same process would have drawn
    spec = _spec(ctx, tmp_path / "run", model, 2, tag="test")
    summary = Trainer(model, ctx.data.train, ctx.data.valid, spec).fit()
    assert _without_seconds(summary["history"]) == _without_seconds(ref_summary["history"])
    assert _same_weights(model, ref_model)


def test_adamw_is_fused_on_cpu_and_follows_the_same_rule():
    """The trainer's AdamW uses the fused kernel on CPU (one kernel instead of a per-tensor loop) and
    updates weights as the loop does, to float rounding."""
    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_(True) for w in weights]
    before = [w.detach().clone() for w in weights]
    fused = adamw([{"params": weights, "weight_decay": 0.01}], 1e-2, torch.device("cpu"))
    loop = torch.optim.AdamW([{"params": twins, "weight_decay": 0.01}], lr=1e-2, foreach=False, fused=False)
    assert fused.defaults["fused"] is True
    for step in range(5):
        for w, t in zip(weights, twins):
            w.grad = torch.full_like(w, 0.1 * (step + 1)) + w.detach()
            t.grad = torch.full_like(t, 0.1 * (step + 1)) + t.detach()
        fused.step()
        loop.step()
    for w, t, b in zip(weights, twins, before):
        assert (w - b).abs().min() > 1e-3  # every weight moved
        torch.testing.assert_close(w, t, rtol=1e-5, atol=1e-6)


def test_the_loss_is_read_on_the_host_every_log_every_steps(ctx, tmp_path, monkeypatch):
    """No host sync per step: the losses stay on the device and are read every train.log_every optimizer steps
    and at the epoch's end (10 steps, log_every 4: 3 reads of floating-point tensors instead of 10), with the
    same running loss."""
    reads, counting = [], {"on": False}
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if counting["on"] and self.is_floating_point():  # the DataLoader reads an integer seed on the host
                reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    epoch = Trainer._epoch

    def counting_epoch(self):
        counting["on"] = True
        try:
            return epoch(self)
        finally:
            counting["on"] = False
    monkeypatch.setattr(Trainer, "_epoch", counting_epoch)
    cfg = tiny_config(ctx.cfg.data.root, extra=["train.log_every=4"])
    model = ctx.new_model(0)
    summary = Trainer(model, ctx.data.train, ctx.data.valid, _spec(ctx, tmp_path / "run", model, 1, cfg=cfg)).fit()
    assert reads == ["tolist"] * 3, reads
    reference = tiny_config(ctx.cfg.data.root, extra=["train.log_every=1"])
    again = ctx.new_model(0)
    other = Trainer(again, ctx.data.train, ctx.data.valid, _spec(ctx, tmp_path / "every", again, 1, cfg=reference)).fit()
    assert summary["history"][0]["loss"] == other["history"][0]["loss"]
