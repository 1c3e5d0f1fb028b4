import json
import shutil

import pytest
import torch

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runtime import Runtime, rng_state, set_rng_state
from gptforge.train import checkpoint as ck

RT = Runtime(device=torch.device("cpu"), dtype=torch.float32)
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)


def save(root, step, model=None, keep_last=3):
    model = model or GPT(CFG)
    return ck.save(
        root, step, model, {"loop": {"step": step}}, {"model": CFG.model_dump()}, rng_state(), RT, keep_last=keep_last
    )


def test_commit_layout_and_verify(tmp_path):
    d = save(tmp_path, 5)
    assert d.name == "step-00000005"
    assert {"model.safetensors", "trainer.pt", "rng_rank0.pt", "meta.json", "manifest.json"} <= {
        f.name for f in d.iterdir()
    }
    files = ck.verify(d)
    assert "manifest.json" not in files and "model.safetensors" in files
    assert not list(tmp_path.glob(".tmp-*"))


def test_uncommitted_folders_are_ignored_and_collected(tmp_path):
    save(tmp_path, 5)
    partial = tmp_path / "step-00000010"
    shutil.copytree(tmp_path / "step-00000005", partial)
    (partial / "manifest.json").unlink()  # killed before the commit marker
    (tmp_path / ".tmp-step-00000015").mkdir()
    assert ck.latest(tmp_path).name == "step-00000005"
    save(tmp_path, 20)
    assert not (tmp_path / ".tmp-step-00000015").exists()
    assert ck.latest(tmp_path).name == "step-00000020"


def test_corruption_is_detected(tmp_path):
    d = save(tmp_path, 1)
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(ck.CheckpointError, match="model.safetensors does not match"):
        ck.verify(d)


def test_keep_last_and_best_are_retained(tmp_path):
    for step in (1, 2):
        save(tmp_path, step, keep_last=2)
    ck.mark_best(tmp_path, tmp_path / "step-00000001", {"val_loss": 1.0})
    for step in (3, 4, 5):
        save(tmp_path, step, keep_last=2)
        assert ck.latest(tmp_path).name == f"step-{step:08d}"
    assert [d.name for d in ck.committed(tmp_path)] == ["step-00000001", "step-00000004", "step-00000005"]
    assert ck.best(tmp_path).name == "step-00000001"
    assert ck.resolve(tmp_path).name == "step-00000001"  # resolve prefers the best


def test_refuses_nonfinite_weights(tmp_path):
    model = GPT(CFG)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ck.CheckpointError, match="h.0.mlp.c_fc.weight"):
        save(tmp_path, 1, model)
    assert ck.latest(tmp_path) is None


def test_weights_and_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    torch.manual_seed(123)
    d = save(tmp_path, 7, model)
    expect = torch.rand(3)
    again = GPT(CFG)
    ck.load_weights(d, again)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert again.lm_head.weight.data_ptr() == again.wte.weight.data_ptr()  # still tied
    trainer, rng = ck.load_trainer_state(d, 0)  # weights_only=True inside
    assert trainer["loop"]["step"] == 7
    set_rng_state(rng)
    assert torch.equal(torch.rand(3), expect)


def test_other_model_size_is_refused_by_name(tmp_path):
    d = save(tmp_path, 1)
    with pytest.raises(ck.CheckpointError, match="does not fit"):
        ck.load_weights(d, GPT(CFG.model_copy(update={"n_embd": 32})))
    meta = json.loads((d / "meta.json").read_text())
    assert ck.diff_fields(meta["model"], {**meta["model"], "n_layer": 3}, "model.") == [
        "model.n_layer: checkpoint 1, config 3"
    ]


def test_resolve_reports_missing(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no committed checkpoint"):
        ck.resolve(tmp_path)


def test_resaving_a_step_replaces_it_atomically(tmp_path):
    torch.manual_seed(1)
    first = save(tmp_path, 3)
    digest = ck.verify(first)["model.safetensors"]
    torch.manual_seed(2)
    again = save(tmp_path, 3)
    assert again == first and ck.verify(again)["model.safetensors"] != digest
    assert not list(tmp_path.glob(".old-*")) and not list(tmp_path.glob(".tmp-*"))
