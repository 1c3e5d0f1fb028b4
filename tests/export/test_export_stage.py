"""`gptforge export` end to end through the CLI: a saved checkpoint becomes a Hugging Face folder or a GGUF file with
export.json, config.yaml and a ledger entry beside it; classifiers, inexact architectures and existing outputs are
refused with one line naming the problem; a quantized checkpoint is dequantized before export."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from gptforge import cli
from gptforge.config import load
from gptforge.model.heads import ClassifierGPT
from gptforge.model.hf_import import load_hf_model
from gptforge.runtime import Runtime
from gptforge.stages import export
from gptforge.train import checkpoint as ckpt_lib
from tests.export.conftest import VARIANTS, make_model

RT = Runtime(device=torch.device("cpu"), dtype=torch.float32)


def save_ckpt(root: Path, tok, model, **meta) -> Path:
    gpt = getattr(model, "gpt", model)
    meta = {"model": gpt.config.model_dump(), "stage": "pretrain", "tokenizer_sha256": tok.sha256(), **meta}
    return ckpt_lib.save(root / "checkpoints", 7, model, {}, meta, {}, RT, tokenizer_file=tok.path)


@pytest.fixture
def ckpt(tmp_path, tok):
    model = make_model(tok, **VARIANTS["llama-untied"])
    return save_ckpt(tmp_path / "pretrain", tok, model), model


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["export", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_hf_export_end_to_end(tmp_path, ckpt, capsys):
    path, model = ckpt
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, f"--ckpt={tmp_path / 'pretrain'}", "--format=hf", f"--run_dir={run}")
    assert rc == 0, err
    folder = run / "export" / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert str(folder) in out and "AutoModelForCausalLM.from_pretrained" in out
    back, _ = load_hf_model(folder)
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])

    summary = json.loads((run / "export" / "hf.export.json").read_text())
    assert summary["checkpoint"] == str(path) and summary["step"] == 7 and summary["model_type"] == "llama"
    assert summary["num_params"] == model.num_params() and summary["dequantized"] is False
    assert summary["size_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    saved = load(export.Config, run / "export" / "config.yaml")
    assert saved == export.Config(ckpt=str(tmp_path / "pretrain"), format="hf", run_dir=str(run))
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert ledger[-1]["stage"] == "export/hf" and ledger[-1]["status"] == "ok"

    rc, _, err = run_cli(capsys, f"--ckpt={path}", "--format=hf", f"--run_dir={run}")
    assert rc == 2 and "not empty" in err and "--overwrite" in err  # one line, nothing replaced
    rc, _, err = run_cli(capsys, f"--ckpt={path}", "--format=hf", f"--run_dir={run}", "--overwrite", "--dtype=float16")
    assert rc == 0, err
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"


def test_gguf_export_end_to_end(tmp_path, ckpt, capsys):
    gguf = pytest.importorskip("gguf")
    path, model = ckpt
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, f"--ckpt={path}", "--format=gguf", "--gguf_type=q8_0", f"--run_dir={run}")
    assert rc == 0, err
    f = run / "export" / "gguf" / "model-q8_0.gguf"
    assert f.is_file() and str(f) in out and "llama-cli -m" in out
    reader = gguf.GGUFReader(f)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.name"].contents() == "pretrain-step7"
    summary = json.loads((run / "export" / "model-q8_0.gguf.export.json").read_text())
    assert summary["qtype"] == "q8_0" and summary["size_bytes"] == f.stat().st_size
    assert (run / "export" / "config.yaml").is_file()

    custom = tmp_path / "elsewhere" / "tiny.gguf"
    rc, _, err = run_cli(capsys, f"--ckpt={path}", "--format=gguf", f"--out={custom}", f"--run_dir={run}")
    assert rc == 0, err
    assert custom.is_file() and not (custom.parent / "config.yaml").exists()  # nothing written beside a custom --out
    assert (run / "export" / "tiny.gguf.export.json").is_file()


def test_classifier_is_refused(tmp_path, tok, capsys):
    clf = ClassifierGPT(make_model(tok, **VARIANTS["llama-tied"]), 3)
    save_ckpt(tmp_path / "clf", tok, clf, task="classify", head={"n_classes": 3, "pooling": "last"})
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, f"--ckpt={tmp_path / 'clf'}", f"--run_dir={run}")
    assert rc == 2 and "classifier" in err and "task=classify" in err
    assert not (run / "export").exists()


def test_inexact_architecture_is_refused_by_field(tmp_path, tok, capsys):
    save_ckpt(tmp_path / "ln", tok, make_model(tok, norm="layernorm"))
    rc, _, err = run_cli(capsys, f"--ckpt={tmp_path / 'ln'}", f"--run_dir={tmp_path / 'run'}", "--format=gguf")
    assert rc == 2 and "model.norm='layernorm'" in err
    rc, _, err = run_cli(capsys, f"--ckpt={tmp_path / 'ln'}", "--format=onnx")
    assert rc == 2 and "format" in err


def test_quantized_checkpoint_is_dequantized_first(tmp_path, tok, monkeypatch):
    """The stage calls compress.quantize.dequantize_model exactly when meta says the checkpoint is quantized."""
    float_model = make_model(tok, seed=3, **VARIANTS["qwen2"])
    calls = []

    def dequantize_model(m):
        calls.append(m)
        return float_model

    fake = types.ModuleType("gptforge.compress.quantize")
    fake.dequantize_model = dequantize_model
    monkeypatch.setitem(sys.modules, "gptforge.compress.quantize", fake)
    stand_in = make_model(tok, **VARIANTS["llama-tied"])
    meta = {"checkpoint": "runs/q/compress/int8/checkpoints/step-00000007", "step": 7, "compression": {}}
    monkeypatch.setattr("gptforge.train.models.load_for_inference", lambda path, device, **kw: (stand_in, tok, meta))

    cfg = export.Config(ckpt="x", run_dir=str(tmp_path / "a"))
    assert export.run(cfg)["dequantized"] is False and calls == []  # float checkpoint: untouched
    meta["compression"] = {"quantization": {"scheme": "int8", "modules": ["h.0.attn.c_q"]}}
    result = export.run(export.Config(ckpt="x", run_dir=str(tmp_path / "b")))
    assert calls == [stand_in] and result["dequantized"] is True
    assert result["model_type"] == "qwen2"  # what was exported is the dequantized model
    back, _ = load_hf_model(tmp_path / "b" / "export" / "hf")
    assert torch.equal(back.h[0].attn.c_q.bias, float_model.h[0].attn.c_q.bias)


def test_help_lists_every_field(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    for name in export.Config.model_fields:
        assert f"--{name}" in out


def test_real_int8_checkpoint_exports_its_dequantized_weights(tmp_path, tok):
    quantize = pytest.importorskip("gptforge.compress.quantize")
    model = make_model(tok, **VARIANTS["gpt2-untied"])
    spec = quantize.quantize_model(model, "int8", ["*"], [], 64)
    expected = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, quantize.QuantLinear)}
    assert expected  # something was quantized
    ckpt = save_ckpt(tmp_path / "q", tok, model, compression={"quantization": spec, "source": "float"})
    result = export.run(export.Config(ckpt=str(ckpt), run_dir=str(tmp_path / "run")))
    assert result["dequantized"] is True
    back, _ = load_hf_model(tmp_path / "run" / "export" / "hf")
    for name, w in expected.items():  # wte.table: a quantized embedding's table
        assert torch.equal(back.get_submodule(name.removesuffix(".table")).weight, w), name
    assert "wte.table" in expected
