import json
import shutil

import pytest

from tests.conftest import pretrain


def _train(tmp_path, name, tokenizer_run, corpus, *flags) -> list[float]:
    """Run 4 tiny steps with extra flags; return the logged training losses."""
    run = tmp_path / name
    shutil.copytree(tokenizer_run / "tokenizer", run / "tokenizer")
    assert pretrain(run, corpus, "--train.max_steps=4", "--train.eval_every=4", *flags) == 0
    rows = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_tensorboard_event_files(tmp_path, corpus, tokenizer_run):
    pytest.importorskip("tensorboard")
    _train(tmp_path, "tb", tokenizer_run, corpus, "--tensorboard")
    assert list((tmp_path / "tb" / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))


def test_float32_and_bf16_runs_agree_roughly(tmp_path, corpus, tokenizer_run):
    fp32 = _train(tmp_path, "fp32", tokenizer_run, corpus, "--dtype=float32")
    bf16 = _train(tmp_path, "bf16", tokenizer_run, corpus, "--dtype=bfloat16")
    assert fp32 == pytest.approx(bf16, rel=2e-2)


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path, corpus, tokenizer_run):
    eager = _train(tmp_path, "eager", tokenizer_run, corpus, "--dtype=float32")
    compiled = _train(tmp_path, "compiled", tokenizer_run, corpus, "--dtype=float32", "--compile")
    assert compiled == pytest.approx(eager, rel=1e-3)
