"""`gptforge compress` end to end on the tiny trained run: reports, reloadable checkpoints, serving unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptforge.compress.quantize import Int4Linear, Int8Linear, QuantEmbedding
from gptforge.train.models import load_for_inference
from tests.stages.ft_helpers import build_classify_run, classify_records, run_cli, shared_run, write_jsonl

FAST = ["--decode_tokens=8", "--repeats=1", "--eval_windows=16", "--calib_samples=32"]


def compress(capsys, run: Path, out_dir: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "compress", f"--ckpt={run / 'pretrain'}", f"--run_dir={out_dir}", *FAST, *args)


def report(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / "compress" / name / "report.json").read_text())


def test_int8_report_and_reload(capsys, trained_run, tmp_path):
    rc, out, err = compress(capsys, trained_run, tmp_path)
    assert rc == 0, err
    r = report(tmp_path, "int8")
    b, a, c = r["before"], r["after"], r["change"]
    assert {"size_bytes", "params", "loss", "ppl", "bpb", "decode_tok_s"} <= set(b) & set(a)
    assert a["params"] == b["params"]  # quantization keeps every weight, just smaller
    assert c["size_ratio"] < 0.4 and abs(c["ppl_delta_pct"]) < 2.0
    assert "size on disk" in (tmp_path / "compress" / "int8" / "report.md").read_text()
    assert "size_ratio" in out
    # The checkpoint reloads as a quantized model computing what the report measured.
    model, _, meta = load_for_inference(tmp_path / "compress" / "int8")
    assert meta["compression"]["quantization"]["scheme"] == "int8" and meta["stage"] == "compress"
    assert isinstance(model.h[0].attn.c_q, Int8Linear) and isinstance(model.wte, QuantEmbedding)
    assert model.wte.table is model.lm_head
    src, _, _ = load_for_inference(trained_run / "pretrain")
    x = torch.randint(0, 300, (1, 20))
    assert (model(x)[0] - src(x)[0]).abs().max() < 0.05 * src(x)[0].abs().max()
    # Running again without --overwrite refuses; with it, replaces; a folder that is no compress output never is.
    rc, _, err = compress(capsys, trained_run, tmp_path)
    assert rc == 2 and "already exists" in err
    assert compress(capsys, trained_run, tmp_path, "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "compress").iterdir()) == ["int8"]  # no temporary folders left
    (tmp_path / "compress" / "mine").mkdir()
    (tmp_path / "compress" / "mine" / "notes.txt").write_text("keep me")
    rc, _, err = compress(capsys, trained_run, tmp_path, "--name=mine", "--overwrite")
    assert rc == 2 and "not the output of a compress run" in err
    assert (tmp_path / "compress" / "mine" / "notes.txt").read_text() == "keep me"


def test_generate_and_serve_a_quantized_checkpoint(capsys, trained_run, tmp_path):
    from fastapi.testclient import TestClient

    from gptforge.stages import serve

    assert compress(capsys, trained_run, tmp_path, "--quantize=int4", "--group_size=32", "--decode_tokens=0")[0] == 0
    ckpt = tmp_path / "compress" / "int4-g32"
    rc, out, err = run_cli(capsys, "generate", f"--ckpt={ckpt}", "--prompt=Shall I", "--max_new_tokens=6")
    assert rc == 0, err
    app, *_ = serve.build_app(serve.Config(ckpt=str(ckpt), device="cpu", dtype="float32"), keys=[])
    with TestClient(app) as client:
        r = client.post(
            "/v1/completions", json={"model": "int4-g32", "prompt": "Shall I", "max_tokens": 5, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1


def test_wanda_recovery_then_int4(capsys, trained_run, tmp_path):
    args = ["--prune=wanda", "--sparsity=0.5", "--recover_steps=4", "--recover_batch=4", "--quantize=int4"]
    rc, _, err = compress(capsys, trained_run, tmp_path, *args, "--group_size=32", "--name=w")
    assert rc == 0, err
    r = report(tmp_path, "w")
    assert r["pruning"]["method"] == "wanda" and abs(r["pruning"]["sparsity"] - 0.5) < 0.01
    assert r["pruning"]["calibration_sequences"] == 32
    assert r["recovery"]["steps"] == 4 and r["recovery"]["last_loss"] > 0
    model, _, _ = load_for_inference(tmp_path / "compress" / "w")
    assert isinstance(model.h[1].mlp.c_proj, Int4Linear)


def test_sparsity_survives_recovery_without_quantization(capsys, trained_run, tmp_path):
    args = ["--prune=magnitude", "--sparsity=0.6", "--recover_steps=3", "--recover_batch=4", "--quantize=none"]
    assert compress(capsys, trained_run, tmp_path, *args, "--name=m")[0] == 0
    model, _, _ = load_for_inference(tmp_path / "compress" / "m")
    w = model.h[0].mlp.c_fc.weight
    assert abs(float((w == 0).float().mean()) - 0.6) < 0.01  # recovery kept every pruned weight at zero
    assert float((model.lm_head.weight == 0).float().mean()) < 0.01  # the output layer is never pruned


def test_structured_gives_a_smaller_dense_model(capsys, trained_run, tmp_path):
    args = ["--prune=structured", "--heads_keep=0.5", "--mlp_keep=0.5", "--quantize=none", "--name=s"]
    rc, _, err = compress(capsys, trained_run, tmp_path, *args)
    assert rc == 0, err
    r = report(tmp_path, "s")
    assert r["change"]["params_ratio"] < 0.9 and r["change"]["size_ratio"] < 0.9
    assert r["pruning"]["importance"] == "activations"  # the run's training windows were there to calibrate on
    model, _, meta = load_for_inference(tmp_path / "compress" / "s")
    src_cfg = load_for_inference(trained_run / "pretrain")[0].config
    assert meta["model"]["n_head"] == src_cfg.n_head // 2 and meta["model"]["head_size"] == src_cfg.head_dim
    assert model.config.hidden_dim == src_cfg.hidden_dim // 2
    out = model.generate(torch.tensor([[1, 5, 9]]), 5, temperature=0)
    assert out.shape == (1, 8)


def test_classifier_report_has_task_metrics(capsys, trained_run, corpus, tmp_path_factory, tmp_path):
    run = shared_run(tmp_path_factory, "classify", build_classify_run(corpus, trained_run / "pretrain"))
    data = write_jsonl(tmp_path / "test.jsonl", classify_records(corpus, 6))
    ckpt = run / "run" / "finetune" / "classify"
    rc, _, err = run_cli(capsys, "compress", f"--ckpt={ckpt}", f"--run_dir={tmp_path}", *FAST)
    assert rc == 2 and "--eval_data" in err
    rc, _, err = run_cli(capsys, "compress", f"--ckpt={ckpt}", f"--run_dir={tmp_path}", f"--eval_data={data}", *FAST)
    assert rc == 0, err
    r = report(tmp_path, "int8")
    assert {"accuracy", "f1_macro"} <= set(r["before"]) and "accuracy_delta" in r["change"]
    assert "decode_tok_s" not in r["after"]
    model, _, meta = load_for_inference(tmp_path / "compress" / "int8")
    assert meta["task"] == "classify" and isinstance(model.gpt.h[0].attn.c_q, Int8Linear)
    assert isinstance(model.head, torch.nn.Linear)  # the classification head stays float


@pytest.mark.parametrize(
    "args,message",
    [
        (["--quantize=none"], "nothing to do"),
        (["--quantize=int4", "--group_size=48"], "group_size must be"),
        (["--include=h.*.atn.*"], "matches no Linear module"),
        (["--eval_data=/nonexistent/file.txt"], "nonexistent"),
        (["--name=.."], "must be one folder name"),
        (["--eval_data=a.txt", "--calib_data=./a.txt", "--prune=wanda"], "are the same"),
        (["--recover_steps=5"], "follows pruning"),
        (["--prune=structured", "--quantize=none", "--exclude=lm_head"], "quantization only"),
    ],
)
def test_bad_arguments_are_named(capsys, trained_run, tmp_path, args, message):
    rc, _, err = compress(capsys, trained_run, tmp_path, *args)
    assert rc == 2 and message in err


def test_quantized_checkpoint_is_not_compressed_again_nor_fine_tuned(capsys, trained_run, tmp_path):
    assert compress(capsys, trained_run, tmp_path, "--decode_tokens=0")[0] == 0
    ckpt = tmp_path / "compress" / "int8"
    rc, _, err = run_cli(capsys, "compress", f"--ckpt={ckpt}", f"--run_dir={tmp_path}", "--name=again")
    assert rc == 2 and "already quantized" in err
    from gptforge.train.checkpoint import CheckpointError
    from gptforge.train.models import load_base

    with pytest.raises(CheckpointError, match="is quantized"):
        load_base(ckpt)
