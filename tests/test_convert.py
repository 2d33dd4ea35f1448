"""Converting an LXMERT release checkpoint (original `bert.*` naming) into LxmertModel + answer head."""
import json
from pathlib import Path

import pytest
import torch
from transformers import LxmertConfig, LxmertForPreTraining, LxmertModel

from lxmert.core.config import ModelConfig
from lxmert.core.errors import InputError
from lxmert.core.files import load_tensors, save_tensors
from lxmert.modeling.convert import convert, main
from lxmert.modeling.vqa import build_model

# Real records of the release's answer table (tests/fixtures/lxmert_all_ans_records.json names its source).
ALL_ANS = json.loads((Path(__file__).parent / "fixtures" / "lxmert_all_ans_records.json").read_text())["records"]
RELEASE_ANSWERS = [r["ans"] for r in ALL_ANS]
# Task answers with near misses; the original's rule (airsplay/lxmert qa_answer_table.py convert_ans + ANS_CONVERT)
# maps them to these release answers, and leaves the others without a row (zero weights, zero bias).
PROJECT_ANSWERS = ["no", "yes", "grey", "two", "the beach", "", "dog", "purple", "a woman", "Black and white.", "a",
                   "a man"]
COPIED = {"no": "no", "yes": "yes", "grey": "gray", "two": "2", "the beach": "beach", "dog": "dog", "a woman": "woman",
          "Black and white.": "black and white", "a": "a", "a man": "man"}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny pretraining model saved the way the LXMERT release names its keys."""
    torch.manual_seed(0)
    config = LxmertConfig(vocab_size=300, hidden_size=28, num_attention_heads=2, intermediate_size=64,
                          l_layers=2, x_layers=1, r_layers=1, visual_feat_dim=128, num_qa_labels=len(RELEASE_ANSWERS))
    model = LxmertForPreTraining(config)
    for p in model.parameters():  # no structure (ones, zeros) a wrong mapping could hide behind
        torch.nn.init.normal_(p, std=0.5)
    state = {("bert." + k.removeprefix("lxmert.")) if k.startswith("lxmert.") else k: v.clone()
             for k, v in model.state_dict().items()}
    assert any(k.startswith("answer_head.logit_fc.3.") for k in state)
    folder = tmp_path_factory.mktemp("release")
    torch.save(state, folder / "model_LXRT.pth")
    (folder / "all_ans.json").write_text(json.dumps(ALL_ANS))
    (folder / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(PROJECT_ANSWERS)}))
    return folder, state


def _convert(release, out, **kw):
    folder, _ = release
    return convert(folder / "model_LXRT.pth", folder / "ans2label.json", out, log=lambda m: None, **kw)


def test_every_tensor_lands_where_it_belongs(release, tmp_path):
    folder, state = release
    report = _convert(release, tmp_path / "out", pretrained_answers=folder / "all_ans.json",
                      num_attention_heads=2)
    encoder = LxmertModel.from_pretrained(tmp_path / "out")
    assert encoder.config.num_attention_heads == 2 and encoder.config.l_layers == 2
    converted = encoder.state_dict()
    encoder_keys = {k for k in state if k.startswith("bert.")}
    assert {"bert." + k for k in converted} == encoder_keys
    for key in encoder_keys:
        torch.testing.assert_close(converted[key.removeprefix("bert.")], state[key], rtol=0, atol=0)
    head = load_tensors(tmp_path / "out/head.safetensors")
    assert set(head) == {f"head.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    for i in (0, 2):
        for p in ("weight", "bias"):
            torch.testing.assert_close(head[f"head.{i}.{p}"], state[f"answer_head.logit_fc.{i}.{p}"], rtol=0, atol=0)
    src_w, src_b = state["answer_head.logit_fc.3.weight"], state["answer_head.logit_fc.3.bias"]
    for label, answer in enumerate(PROJECT_ANSWERS):
        if answer in COPIED:
            row = RELEASE_ANSWERS.index(COPIED[answer])
            torch.testing.assert_close(head["head.3.weight"][label], src_w[row], rtol=0, atol=0)
            assert head["head.3.bias"][label] == src_b[row]
        else:  # as the original: a zero row and a zero bias, not a random row
            assert head["head.3.bias"][label] == 0 and not head["head.3.weight"][label].any()
    assert report["answer_rows_copied"] == len(COPIED)
    assert report["answers_not_in_release"] == ["", "purple"], "the empty answer does not take the row of 'a'"
    dropped = set(report["dropped_keys"])
    assert dropped == {k for k in state if k.startswith(("cls.", "obj_predict_head."))}
    assert encoder_keys | dropped | {k for k in state if k.startswith("answer_head.")} == set(state)


def test_converted_folder_builds_the_project_model(release, tmp_path):
    folder, _ = release
    _convert(release, tmp_path / "out", pretrained_answers=folder / "all_ans.json", num_attention_heads=2)
    model = build_model(ModelConfig(pretrained=str(tmp_path / "out")), 300, 128, len(PROJECT_ANSWERS))
    head = load_tensors(tmp_path / "out/head.safetensors")  # loaded by build_model: study A's starting point
    for key, value in model.head.state_dict().items():
        torch.testing.assert_close(value, head["head." + key], rtol=0, atol=0)
    with pytest.raises(InputError, match="head.safetensors: QA head does not fit"):
        build_model(ModelConfig(pretrained=str(tmp_path / "out")), 300, 128, len(PROJECT_ANSWERS) + 1)
    batch = {"input_ids": torch.tensor([[1, 5, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "visual_feats": torch.randn(1, 4, 128), "visual_pos": torch.rand(1, 4, 4)}
    logits, _ = model.eval()(batch)
    assert logits.shape == (1, len(PROJECT_ANSWERS))


def test_answer_prior_shifts_the_loaded_head_and_keeps_its_answer(release, tmp_path):
    """model.answer_prior shifts every output bias of the (loaded) head by log(p / (1 - p)): answers whose bias
    was 0 start at sigmoid p, the weights stay as loaded and the top answer is unchanged."""
    import math
    folder, _ = release
    _convert(release, tmp_path / "out", pretrained_answers=folder / "all_ans.json", num_attention_heads=2)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(pretrained=str(tmp_path / "out")), 300, 128, len(PROJECT_ANSWERS))
    torch.manual_seed(0)
    shifted = build_model(ModelConfig(pretrained=str(tmp_path / "out"), answer_prior=0.01), 300, 128,
                          len(PROJECT_ANSWERS))
    delta = shifted.head[-1].bias - plain.head[-1].bias
    torch.testing.assert_close(delta, torch.full_like(delta, math.log(0.01 / 0.99)))
    torch.testing.assert_close(shifted.head[-1].weight, plain.head[-1].weight, rtol=0, atol=0)
    torch.testing.assert_close(shifted.encoder.state_dict(), plain.encoder.state_dict(), rtol=0, atol=0)
    uncopied = plain.head[-1].bias == 0  # answers the release has no row for (zero bias, zero weights)
    assert uncopied.any() and torch.allclose(torch.sigmoid(shifted.head[-1].bias[uncopied]), torch.tensor(0.01))
    batch = {"input_ids": torch.tensor([[1, 5, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "visual_feats": torch.randn(1, 4, 128), "visual_pos": torch.rand(1, 4, 4)}
    assert torch.equal(plain.eval()(batch)[0].argmax(1), shifted.eval()(batch)[0].argmax(1))


def test_head_built_for_another_answer_order_is_refused(release, tmp_path, caplog):
    """Same number of answers, another order: the head's shapes fit, and without the recorded vocabulary
    digest every answer would silently be scored with another answer's row."""
    folder, _ = release
    _convert(release, tmp_path / "out", pretrained_answers=folder / "all_ans.json", num_attention_heads=2)
    cfg = ModelConfig(pretrained=str(tmp_path / "out"))
    model = build_model(cfg, 300, 128, len(PROJECT_ANSWERS), answers=PROJECT_ANSWERS)  # its own order: loads
    torch.testing.assert_close(model.head[3].bias, load_tensors(tmp_path / "out/head.safetensors")["head.3.bias"])
    swapped = [PROJECT_ANSWERS[1], PROJECT_ANSWERS[0], *PROJECT_ANSWERS[2:]]
    with pytest.raises(InputError, match="head.safetensors: QA head built for another answer vocabulary"):
        build_model(cfg, 300, 128, len(PROJECT_ANSWERS), answers=swapped)
    # a head written before the digest was recorded loads, with a warning that it was not checked
    head = load_tensors(tmp_path / "out/head.safetensors")
    save_tensors(tmp_path / "out/head.safetensors", head, metadata={"num_answers": str(len(PROJECT_ANSWERS))})
    with caplog.at_level("WARNING"):
        build_model(cfg, 300, 128, len(PROJECT_ANSWERS), answers=swapped)
    assert "records no answer vocabulary" in caplog.text


def test_original_answer_conversion_rule():
    from lxmert.modeling.convert import convert_answer

    assert [convert_answer(a) for a in ["", "Grey", "The beach.", "an apple", "a man", "Two", "a", "the"]] == \
        ["", "gray", "beach", "apple", "man", "2", "a", "the"]


@pytest.mark.parametrize("heads", ["-1", "0", "two"])
def test_bad_head_count_is_one_error_line(release, tmp_path, heads, capsys):
    folder, _ = release
    code = main(["--checkpoint", str(folder / "model_LXRT.pth"), "--answers", str(folder / "ans2label.json"),
                 "--out", str(tmp_path / "out"), f"--num-attention-heads={heads}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --num-attention-heads {heads}: give a positive number of attention heads"]
    assert not (tmp_path / "out").exists()


def test_without_answer_list_no_rows_are_copied(release, tmp_path):
    report = _convert(release, tmp_path / "out", num_attention_heads=2)
    assert report["answer_rows_copied"] == 0
    assert "answer_head.logit_fc.3.weight" in report["dropped_keys"]
    assert torch.all(load_tensors(tmp_path / "out/head.safetensors")["head.3.bias"] == 0)


def _edited(release, tmp_path, edit):
    folder, state = release
    state = dict(state)
    edit(state)
    torch.save(state, tmp_path / "model_LXRT.pth")
    return tmp_path / "model_LXRT.pth"


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"bert.encoder.extra.weight": torch.zeros(2)}), "bert.encoder.extra.weight"),
    (lambda s: s.update({"vqa_head.weight": torch.zeros(2)}), "vqa_head.weight"),
    (lambda s: s.pop("bert.pooler.dense.bias"), "bert.pooler.dense.bias"),
])
def test_unplaced_or_missing_keys_stop_the_conversion(release, tmp_path, edit, words):
    folder, _ = release
    path = _edited(release, tmp_path, edit)
    with pytest.raises(InputError, match=words.replace(".", r"\.")):
        convert(path, folder / "ans2label.json", tmp_path / "out", num_attention_heads=2, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_missing_files_say_what_to_download(release, tmp_path, capsys):
    folder, _ = release
    assert main(["--checkpoint", str(tmp_path / "model_LXRT.pth"), "--answers", str(folder / "ans2label.json"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and "nlp.cs.unc.edu/data/model_LXRT.pth" in err
    assert "data/README.md" in err
    with pytest.raises(InputError, match="all_ans.json"):
        _convert(release, tmp_path / "out", pretrained_answers=tmp_path / "nope.json", num_attention_heads=2)
    wrong = tmp_path / "short.json"
    wrong.write_text(json.dumps(RELEASE_ANSWERS[:5]))
    with pytest.raises(InputError, match="5 answers, but the checkpoint's QA head has 12 rows"):
        _convert(release, tmp_path / "out", pretrained_answers=wrong, num_attention_heads=2)
