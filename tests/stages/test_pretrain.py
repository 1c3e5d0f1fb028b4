import json
import shutil

import pytest

from gptforge.train import checkpoint as ck
from tests.conftest import pretrain


def test_outputs_of_a_run(trained_run):
    out = trained_run / "pretrain"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "tokens/meta.json"):
        assert (out / name).is_file(), name
    assert [d.name for d in ck.committed(out / "checkpoints")] == ["step-00000006", "step-00000012"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]  # validation loss falls
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["val"]["val_ppl"] > 1 and summary["val"]["val_bpb"] > 0
    ledger = [json.loads(x) for x in (trained_run / "ledger.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in ledger] == ["pretrain"]


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resume_continues_and_matches_uninterrupted(trained_run, corpus, tmp_path):
    """12 steps in one go vs 6 + resume to 12: identical weights (kill -9 version: tests/test_resume_kill.py)."""
    run = _copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(run / "pretrain" / "checkpoints" / "step-00000012")
    (run / "pretrain" / "checkpoints" / "best.json").unlink()
    rc = pretrain(run, corpus, "--train.max_steps=12", "--train.save_every=6", "--train.eval_every=6", "--resume")
    assert rc == 0
    a = ck.verify(run / "pretrain" / "checkpoints" / "step-00000012")["model.safetensors"]
    b = ck.verify(trained_run / "pretrain" / "checkpoints" / "step-00000012")["model.safetensors"]
    assert a == b
    steps = [
        json.loads(x)["step"]
        for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated tail after resume


@pytest.mark.parametrize("flag,named", [("--model.n_layer=3", "model.n_layer"), ("--model.n_embd=128", "model.n_embd")])
def test_resume_refuses_other_model_size(trained_run, corpus, tmp_path, capsys, flag, named):
    run = _copy_run(trained_run, tmp_path / "run")
    before = ck.verify(ck.latest(run / "pretrain" / "checkpoints"))
    written = {f: (run / "pretrain" / f).read_bytes() for f in ("config.yaml", "tokens/meta.json", "metrics.jsonl")}
    rc = pretrain(run, corpus, flag, "--train.max_steps=20", "--resume")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and named in err and len(err.splitlines()) == 1
    assert ck.verify(ck.latest(run / "pretrain" / "checkpoints")) == before  # nothing damaged
    assert written == {f: (run / "pretrain" / f).read_bytes() for f in written}


def test_resume_refuses_other_tokenizer(trained_run, corpus, tmp_path, capsys):
    from gptforge.stages import tokenizer

    run = _copy_run(trained_run, tmp_path / "run")
    tokenizer.run(tokenizer.Config(run_dir=str(run), input=str(corpus), vocab_size=800, overwrite=True))
    rc = pretrain(run, corpus, "--model.vocab_size=1024", "--train.max_steps=20", "--resume")
    assert rc == 2 and "different tokenizer" in capsys.readouterr().err


def test_nan_run_stops_nonzero_and_keeps_last_good_checkpoint(trained_run, corpus, tmp_path, capsys, monkeypatch):
    run = _copy_run(trained_run, tmp_path / "run")
    good = ck.verify(ck.latest(run / "pretrain" / "checkpoints"))
    monkeypatch.setenv("GPTFORGE_FAULT", "nan_loss@steps=13-100")
    rc = pretrain(run, corpus, "--train.max_steps=30", "--train.save_every=2", "--train.max_nonfinite=3", "--resume")
    assert rc == 2 and "non-finite" in capsys.readouterr().err
    latest = ck.latest(run / "pretrain" / "checkpoints")
    # Step 13 trains, the steps counted 14.. are NaN: the save at 14 holds finite weights, then 3 skips in a row stop.
    assert latest.name == "step-00000014"
    assert ck.verify(latest)
    assert ck.verify(run / "pretrain" / "checkpoints" / "step-00000012") == good


def test_resume_refuses_changed_input(trained_run, corpus, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path / "run")
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    (data / "extra.txt").write_text("More text arrives. " * 200)
    rc = pretrain(run, data, "--train.max_steps=20", "--resume")
    assert rc == 2 and "input (content hash): checkpoint" in capsys.readouterr().err
    assert (run / "pretrain" / "tokens" / "meta.json").read_bytes() == (
        trained_run / "pretrain" / "tokens" / "meta.json"
    ).read_bytes()  # the shards of the run were not rebuilt


def test_fresh_start_over_existing_checkpoints_is_refused(trained_run, corpus, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path / "run")
    before = sorted(p.name for p in (run / "pretrain" / "checkpoints").iterdir())
    rc = pretrain(run, corpus, "--train.max_steps=4")
    err = capsys.readouterr().err
    assert rc == 2 and "already holds checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in (run / "pretrain" / "checkpoints").iterdir()) == before
    assert pretrain(run, corpus, "--resume", "--overwrite") == 2


def test_overwrite_starts_over_cleanly(trained_run, corpus, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    rc = pretrain(run, corpus, "--train.max_steps=4", "--train.eval_every=4", "--train.save_every=4", "--overwrite")
    assert rc == 0
    ckpts = run / "pretrain" / "checkpoints"
    assert [d.name for d in ck.committed(ckpts)] == ["step-00000004"]  # the old run's 6 and 12 are gone
    assert ck.best(ckpts).name == "step-00000004"


@pytest.mark.parametrize(
    "flag,named",
    [
        ("--data.val_fraction=0.3", "data.val_fraction"),
        ("--data.piece_chars=500", "data.piece_chars"),
        ("--data.seed=1", "data.seed"),
        ("--seed=7", "seed: checkpoint 1337, config 7"),
        ("--train.micro_batch_size=2", "sequences per optimizer step: checkpoint 4, config 2"),
    ],
)
def test_resume_refuses_other_data_settings(trained_run, corpus, tmp_path, capsys, flag, named):
    run = _copy_run(trained_run, tmp_path / "run")
    written = {f: (run / "pretrain" / f).read_bytes() for f in ("config.yaml", "tokens/meta.json")}
    rc = pretrain(run, corpus, flag, "--train.max_steps=20", "--resume")
    assert rc == 2 and named in capsys.readouterr().err
    assert written == {f: (run / "pretrain" / f).read_bytes() for f in written}


def test_failed_start_leaves_the_run_as_it_was(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path / "run")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"\x00\x01binary")
    written = {f: (run / "pretrain" / f).read_bytes() for f in ("config.yaml", "tokens/meta.json")}
    assert pretrain(run, bad, "--overwrite") == 2
    assert ": binary:" in capsys.readouterr().err
    assert written == {f: (run / "pretrain" / f).read_bytes() for f in written}
    assert not (run / "pretrain" / "tokens.tmp").exists()
    assert len(ck.committed(run / "pretrain" / "checkpoints")) == 2  # --overwrite deletes only once all checks pass
