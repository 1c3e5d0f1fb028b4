"""Bad input gets one line naming the problem and exit status 2; nothing already written is damaged."""

import json
import shutil
import subprocess
import sys

import pytest

from gptforge.cli import main
from gptforge.train import checkpoint as ck
from tests.conftest import TINY_MODEL, TINY_TRAIN


def run_cli(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_help_lists_stages_and_fields(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and "pretrain" in out and "generate" in out
    rc, out, _ = run_cli(capsys, "pretrain", "--help")
    assert rc == 0 and "--train.lr" in out and "--model.n_kv_head" in out


def test_unknown_stage(capsys):
    rc, _, err = run_cli(capsys, "pretrian")
    assert rc == 2 and "unknown stage 'pretrian'" in err


def test_unknown_config_key(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "tokenizer", f"--run_dir={tmp_path}", "--vocab=100")
    assert rc == 2 and "unknown config key 'vocab'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tokenizer").exists()


def test_missing_config_file(capsys):
    rc, _, err = run_cli(capsys, "pretrain", "--config", "nope.yaml")
    assert rc == 2 and "config file not found: nope.yaml" in err


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "tokenizer", f"--run_dir={tmp_path}/run", f"--input={tmp_path}/empty")
    assert rc == 2 and "no readable text files" in err and len(err.splitlines()) == 1


def test_binary_file(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "weights.txt").write_bytes(bytes(range(256)) * 10)
    rc, _, err = run_cli(capsys, "tokenizer", f"--run_dir={tmp_path}/run", f"--input={tmp_path}/data")
    assert rc == 2 and "weights.txt: binary" in err


def test_missing_tokenizer(capsys, tmp_path, corpus):
    rc, _, err = run_cli(capsys, "pretrain", f"--run_dir={tmp_path}", f"--input={corpus}")
    assert rc == 2 and "tokenizer not found" in err and "gptforge tokenizer" in err


def test_generate_from_other_model_size_checkpoint_is_refused(capsys, tmp_path, trained_run):
    bad = tmp_path / "ckpt"
    shutil.copytree(ck.latest(trained_run / "pretrain" / "checkpoints"), bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["model"]["n_embd"] = 128
    (bad / "meta.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "generate", f"--ckpt={bad}", "--prompt=hi")
    assert rc == 2 and "meta.json does not match" in err  # the manifest catches the edit first
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["meta.json"] = ck.sha256_file(bad / "meta.json")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run_cli(capsys, "generate", f"--ckpt={bad}", "--prompt=hi")
    assert rc == 2 and "does not fit this model" in err and len(err.splitlines()) == 1


def test_generate_is_seeded_and_saves(capsys, tmp_path, trained_run):
    args = [
        "generate",
        f"--ckpt={trained_run / 'pretrain'}",
        "--prompt=Shall I",
        "--prompt=春",
        "--max_new_tokens=12",
        "--temperature=1.0",
        "--seed=5",
    ]
    rc, out1, _ = run_cli(capsys, *args, f"--out_dir={tmp_path}/g")
    rc2, out2, _ = run_cli(capsys, *args)
    assert rc == rc2 == 0 and out1.split("tok/s")[1:] != [] and out1.count("--- prompt") == 2
    samples = [json.loads(x) for x in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["Shall I", "春"]
    assert all(s["new_tokens"] <= 12 for s in samples)
    strip = [ln for ln in out1.splitlines() if "tok/s" not in ln]
    assert strip == [ln for ln in out2.splitlines() if "tok/s" not in ln]  # same seed, same text
    assert (tmp_path / "g" / "config.yaml").is_file()


def test_prompt_too_long(capsys, trained_run):
    rc, _, err = run_cli(capsys, "generate", f"--ckpt={trained_run / 'pretrain'}", "--prompt=" + "word " * 200)
    assert rc == 2 and "context" in err


@pytest.mark.parametrize("bad", ["--train.lr=abc", "--train.max_steps=-3", "--model.norm=batchnorm"])
def test_bad_values(capsys, tmp_path, bad):
    rc, _, err = run_cli(capsys, "pretrain", f"--run_dir={tmp_path}", bad)
    assert rc == 2 and bad.split("=")[0].removeprefix("--") in err


def test_demo_pipeline_runs_end_to_end(capsys, tmp_path, corpus):
    """The demo orchestration with a tiny budget (the full demo is `make demo`)."""
    args = [a for a in TINY_MODEL + TINY_TRAIN if not a.startswith("--progress")]  # demo always shows progress
    rc, out, err = run_cli(
        capsys,
        "demo",
        f"--run_dir={tmp_path}/demo",
        f"--input={corpus}",
        "--vocab_size=600",
        *args,
        "--train.max_steps=6",
        "--train.eval_every=3",
        "--max_new_tokens=8",
        "--model.block_size=128",  # the chat task's poems must fit the context
        "--classify_epochs=0.1",
        "--chat_epochs=0.2",
    )
    assert rc == 0, err
    assert "chars/token" in out and "demo finished" in out and out.count("--- prompt") == 4
    assert (tmp_path / "demo" / "pretrain" / "loss.png").is_file()
    assert (tmp_path / "demo" / "generate" / "samples.jsonl").is_file()
    assert "macro F1" in out and (tmp_path / "demo" / "evaluate" / "classify" / "confusion.png").is_file()
    assert (tmp_path / "demo" / "evaluate" / "chat" / "samples.jsonl").read_text().count("reply") == 4
    assert "compressed     int8" in out and (tmp_path / "demo" / "compress" / "int8" / "report.md").is_file()
    assert (tmp_path / "demo" / "export" / "hf" / "config.json").is_file()
    assert "run report" in out and (tmp_path / "demo" / "report" / "report.html").is_file()


def test_cli_edge_cases(capsys, trained_run):
    ckpt = f"--ckpt={trained_run / 'pretrain'}"
    rc, out, _ = run_cli(capsys, "generate", ckpt, "--prompt", "-h", "--max_new_tokens=2")
    assert rc == 0 and "--- prompt: '-h'" in out  # a value, not a help request
    rc, _, err = run_cli(capsys, "generate", ckpt, "--temperature")
    assert rc == 2 and "needs a value" in err
    rc, _, err = run_cli(capsys, "generate", ckpt, "--device=foo")
    assert rc == 2 and "unknown device 'foo'" in err
    rc, _, err = run_cli(capsys, "generate", ckpt, "--prompt", "ab\udcffcd")  # what argv gives for a non-UTF-8 byte
    assert rc == 2 and "not valid UTF-8" in err
    rc, _, err = run_cli(capsys, "generate", ckpt, "--prompt=hi", "--temperature=1e-45", "--max_new_tokens=3")
    assert rc == 0
    rc, _, err = run_cli(capsys, "pretrain", "--config=")
    assert rc == 2 and "--config needs a file path" in err


# Runs in a fresh interpreter: this test process has long since imported torch. argv[1] is a scratch folder.
NO_TORCH_SCRIPT = """
import json, sys
from pathlib import Path

from gptforge.cli import main
from gptforge.stages import report

tmp = Path(sys.argv[1])
(tmp / "run").mkdir()
(tmp / "run" / "ledger.jsonl").write_text(json.dumps({"stage": "clean", "status": "ok", "metrics": {}}) + "\\n")
(tmp / "text").mkdir()
(tmp / "text" / "a.txt").write_text("one line of text that is long enough to keep.\\n" * 3)
rcs = [
    main(["report", "--help"]),
    main(["report", f"--run_dir={tmp / 'missing'}"]),  # a user error: the error tuple is built
    main(["report", f"--run_dir={tmp / 'run'}"]),
    main(["clean", f"--run_dir={tmp / 'run'}", f"--input={tmp / 'text'}", "--workers=1", "--progress=false"]),
]
print(json.dumps({"rcs": rcs, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))


def diverges(cfg, runtime=None):  # a stage that imports the trainer inside run() and fails there
    from gptforge.train.trainer import NonFiniteError

    raise NonFiniteError("loss is nan at step 3")


report.run = diverges
print(json.dumps({"rcs": [main(["report", f"--run_dir={tmp / 'run'}"])]}))
"""


def test_stages_without_torch_never_import_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    first, second = (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
    assert first == {"rcs": [0, 2, 0, 0], "torch": []}, out.stderr
    assert (tmp_path / "run" / "report" / "report.html").is_file() and (tmp_path / "run" / "clean").is_dir()
    # An error class whose module the stage imported only while running is still a user error (one line, status 2).
    assert second == {"rcs": [2]} and "gptforge report: error: loss is nan at step 3" in out.stderr
