"""Loading refuses what it must: NaN/inf weights (naming the tensor), malformed safetensors, pickles that would run
code. Each file is made valid in the manifest first, so the content check, not the hash check, is what answers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptforge.artifacts import sha256_file
from gptforge.cli import main
from gptforge.train.checkpoint import CheckpointError, load_trainer_state, resolve
from gptforge.train.models import load_base, load_for_inference


def copy_ckpt(trained_run: Path, tmp_path: Path) -> Path:
    import shutil

    src = resolve(trained_run / "pretrain")
    dst = tmp_path / "ckpt" / src.name
    shutil.copytree(src, dst)
    return dst


def rehash(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(ckpt / name) for name in manifest["files"]}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_nonfinite_weights_are_refused_by_name(trained_run, tmp_path, capsys):
    ckpt = copy_ckpt(trained_run, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    rehash(ckpt)
    for load in (load_for_inference, load_base):
        with pytest.raises(CheckpointError, match="'h.1.mlp.c_fc.weight' has non-finite"):
            load(ckpt)
    model, _, _ = load_for_inference(ckpt, allow_nonfinite=True)  # an explicit override, for debugging
    assert torch.isnan(model.h[1].mlp.c_fc.weight).any()
    rc = main(["export", f"--ckpt={ckpt}", f"--run_dir={tmp_path / 'run'}"])
    assert rc == 2 and "h.1.mlp.c_fc.weight" in capsys.readouterr().err
    assert not (tmp_path / "run" / "export" / "hf").exists()


def test_malformed_safetensors_is_a_clean_error(trained_run, tmp_path):
    ckpt = copy_ckpt(trained_run, tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    rehash(ckpt)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_for_inference(ckpt)


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_would_run_code_is_refused(trained_run, tmp_path, capsys):
    ckpt = copy_ckpt(trained_run, tmp_path)
    (ckpt / "trainer.pt").write_bytes(pickle.dumps({"optimizer": RunsCode()}))
    rehash(ckpt)
    with pytest.raises(CheckpointError, match="trainer.pt refused"):
        load_trainer_state(ckpt, 0)
    assert "this must never run" not in capsys.readouterr().out
