import json
import shutil

import pytest

from gptforge.cli import main
from tests.conftest import TINY_MODEL, TINY_TRAIN


def _losses(run):
    rows = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_tensorboard_event_files(tmp_path, corpus, tokenizer_run):
    pytest.importorskip("tensorboard")
    shutil.copytree(tokenizer_run / "tokenizer", tmp_path / "tokenizer")
    rc = main(
        [
            "pretrain",
            f"--run_dir={tmp_path}",
            f"--input={corpus}",
            *TINY_MODEL,
            *TINY_TRAIN,
            "--train.max_steps=3",
            "--train.eval_every=3",
            "--tensorboard",
        ]
    )
    assert rc == 0
    assert list((tmp_path / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))


def test_float32_and_bf16_runs_agree_roughly(tmp_path, corpus, tokenizer_run):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        run = tmp_path / dtype
        shutil.copytree(tokenizer_run / "tokenizer", run / "tokenizer")
        assert (
            main(
                [
                    "pretrain",
                    f"--run_dir={run}",
                    f"--input={corpus}",
                    *TINY_MODEL,
                    *TINY_TRAIN,
                    "--train.max_steps=4",
                    "--train.eval_every=4",
                    f"--dtype={dtype}",
                ]
            )
            == 0
        )
        runs[dtype] = _losses(run)
    assert runs["float32"] == pytest.approx(runs["bfloat16"], rel=2e-2)


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path, corpus, tokenizer_run):
    runs = {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        shutil.copytree(tokenizer_run / "tokenizer", run / "tokenizer")
        assert (
            main(
                [
                    "pretrain",
                    f"--run_dir={run}",
                    f"--input={corpus}",
                    *TINY_MODEL,
                    *TINY_TRAIN,
                    "--train.max_steps=4",
                    "--train.eval_every=4",
                    "--dtype=float32",
                    f"--compile={compiled}",
                ]
            )
            == 0
        )
        runs[compiled] = _losses(run)
    assert runs[True] == pytest.approx(runs[False], rel=1e-3)
