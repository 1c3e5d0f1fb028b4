"""Runtime facts: how `auto` device/dtype were resolved, and the bf16 peak behind the MFU in the training log."""

from __future__ import annotations

import pytest

from tests.conftest import pretrain


def test_runtime_says_how_auto_was_resolved():
    from gptforge.runtime import build_runtime

    auto = build_runtime("auto", "auto").describe()
    assert "device auto:" in auto and "dtype auto:" in auto
    assert build_runtime("cpu", "float32").describe() == "device=cpu dtype=float32"


def test_peak_flops_table_and_mfu_in_the_log(tmp_path, corpus, tokenizer_run, monkeypatch):
    import json
    import shutil

    import torch

    from gptforge import runtime as rt

    assert rt.peak_flops(torch.device("cpu")) == (None, "cpu")  # no guessed peak: MFU is left out on CPUs
    # Real device names; a shorter key must never shadow a longer one (L4 inside L40, H100 inside H100 NVL).
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H200 NVL": 835e12,
        "NVIDIA L40": 181e12,
        "NVIDIA L40S": 362e12,
        "NVIDIA L4": 121e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert rt.peak_flops(torch.device("cuda")) == (peak, name)
    monkeypatch.undo()

    monkeypatch.setattr("gptforge.stages.pretrain.peak_flops", lambda device: (1e9, "fake"))
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run / "tokenizer", run / "tokenizer")
    assert pretrain(run, corpus, "--train.max_steps=2") == 0
    rows = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "pretrain" / "summary.json").read_text())
    logged = [r for r in rows if "tok_s" in r]
    assert logged and all(r["mfu"] == pytest.approx(summary["flops_per_token"] * r["tok_s"] / 1e9) for r in logged)
    assert summary["mfu"] == pytest.approx(summary["flops_per_token"] * summary["tokens_per_s"] / 1e9)
