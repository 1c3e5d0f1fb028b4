"""The clean stage end to end: accounting, determinism across workers and ranks, kill and restart, decontamination."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptforge.data.normalize import NormalizeConfig, Normalizer
from gptforge.stages import clean

ZH = (
    "床前明月光疑是地上霜举头望山低思故乡春眠不觉晓处处闻啼鸟夜来风雨声花落知多少白日依尽黄河入海流欲穷千里目更上一层楼"
)
EN = (
    "the quick brown fox jumps over lazy dog while river runs past old stone bridge under grey sky and children "
    "play near green hills where farmers plant wheat corn barley every spring season"
).split()


def _zh_doc(rng: random.Random, n: int = 120) -> str:
    lines = []
    for _ in range(n // 12):
        lines.append(
            "".join(rng.choice(ZH) for _ in range(5)) + "，" + "".join(rng.choice(ZH) for _ in range(5)) + "。"
        )
    return "\n".join(lines)


def _en_doc(rng: random.Random, n: int = 60) -> str:
    words = [rng.choice(EN) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def make_corpus(root: Path, n: int = 120, seed: int = 0) -> dict:
    """A messy folder with known contents: unique docs, exact and near copies, GBK/Big5/UTF-16 files, ANSI codes,
    a broken JSON line, a binary file, an empty file. Returns the planted facts."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = [(_zh_doc(rng) if i % 2 else _en_doc(rng)) for i in range(n)]
    lines = [json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) for i, t in enumerate(docs)]
    lines.insert(7, '{"id": "broken", "text": "unterminated')
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    copies = [json.dumps({"id": f"x{i}", "text": docs[i]}, ensure_ascii=False) for i in range(0, 10)]
    near = []
    for i in range(10, 20):
        t = docs[i]
        k = len(t) // 2
        near.append(
            json.dumps({"id": f"n{i}", "text": t[:k] + ("之" if i % 2 else "z") + t[k + 1 :]}, ensure_ascii=False)
        )
    with gzip.open(root / "copies.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(copies + near) + "\n")
    (root / "gbk.txt").write_bytes(_zh_doc(rng).encode("gbk"))
    (root / "big5.txt").write_bytes(
        "春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。\n白日依山盡，黃河入海流。".encode("big5")
    )
    (root / "utf16.txt").write_bytes(_en_doc(rng).encode("utf-16"))
    (root / "ansi.txt").write_text("\x1b[31m" + _en_doc(rng) + "\x1b[0m", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "empty.txt").write_bytes(b"")
    return {"docs": n, "exact": 10, "near": 10, "broken_line": 8}


def _cfg(tmp: Path, data: Path, **kw) -> clean.Config:
    base = {"run_dir": str(tmp / "run"), "input": [str(data)], "workers": 1, "shard_mb": 0.004, "progress": False}
    base["read"] = {"id_field": "id"}
    base.update(kw)
    return clean.Config.model_validate(base)


def _digest(out: Path) -> dict[str, str]:
    """sha256 of every output file (data, rejects, quarantine), by relative path."""
    res = {}
    for sub in ("data", "rejects", "quarantine"):
        for p in sorted((out / sub).rglob("*")):
            if p.is_file():
                res[p.relative_to(out).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return res


def _ids(out: Path, sub: str) -> list[str]:
    return [json.loads(ln)["id"] for p in sorted((out / sub).rglob("*.jsonl")) for ln in open(p, encoding="utf-8")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    make_corpus(root)
    return root


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    stats = clean.run(_cfg(tmp, corpus))
    return tmp / "run" / "clean", stats


def test_accounting_balances_and_reasons(reference):
    out, stats = reference
    r, f = stats["records"], stats["files"]
    total = r["kept"] + sum(r["dropped"].values()) + sum(r["deduplicated"].values()) + sum(r["quarantined"].values())
    assert total == r["in"]
    assert f["in"] == f["ok"] + sum(f["skipped"].values()) + sum(f["quarantined"].values()) == 8
    assert f["skipped"] == {"binary": 1, "empty": 1}
    assert r["quarantined"] == {"invalid_json": 1}
    q = [json.loads(ln) for p in (out / "quarantine").glob("*.jsonl") for ln in open(p, encoding="utf-8")]
    assert [(x["source"], x["line"]) for x in q] == [("a.jsonl", 8)]
    assert r["deduplicated"]["exact_duplicate"] == 10
    assert r["deduplicated"]["near_duplicate"] >= 9
    kept = set(_ids(out, "data"))
    assert {f"d{i}" for i in range(20)} <= kept  # the first copy of every cluster is the one kept
    assert not any(k.startswith(("x", "n")) for k in kept)
    dup = [json.loads(ln) for p in (out / "rejects" / "exact_duplicate").glob("*.jsonl") for ln in open(p)]
    assert {d["id"]: d["dup_of"] for d in dup} == {f"x{i}": f"d{i}" for i in range(10)}
    assert stats["encodings"].get("gb18030") == 1 and stats["encodings"].get("big5") == 1
    text = "".join(json.loads(ln)["text"] for p in (out / "data").glob("*.jsonl") for ln in open(p))
    assert "\x1b" not in text and "春眠不覺曉" in text
    for name in ("stats.json", "report.md", "report.html", "files.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    assert "<img" in (out / "report.html").read_text() and "data:image/png;base64," in (out / "report.html").read_text()


def test_same_output_for_any_worker_count(reference, corpus, tmp_path):
    out, _ = reference
    clean.run(_cfg(tmp_path, corpus, workers=2))
    assert _digest(tmp_path / "run" / "clean") == _digest(out)


def test_two_ranks_cover_every_document_once(reference, corpus, tmp_path):
    out, stats = reference
    for step in ("scan", "dedup", "write", "report"):
        for rank in (0, 1):
            clean.run(_cfg(tmp_path, corpus, rank=rank, world_size=2, step=step))
    ranked = tmp_path / "run" / "clean"
    assert _digest(ranked) == _digest(out)
    seen = _ids(ranked, "data") + _ids(ranked, "rejects")
    assert len(seen) == len(set(seen)) == stats["records"]["in"] - 1  # everything but the quarantined line


def test_rerun_skips_and_changed_settings_are_refused(reference, corpus, tmp_path):
    cfg = _cfg(tmp_path, corpus)
    clean.run(cfg)
    before = _digest(tmp_path / "run" / "clean")
    clean.run(cfg)  # everything done: nothing rescanned, same output
    assert _digest(tmp_path / "run" / "clean") == before
    with pytest.raises(ValueError, match="different settings"):
        clean.run(_cfg(tmp_path, corpus, filters={"min_chars": 5}))
    stats = clean.run(_cfg(tmp_path, corpus, filters={"min_chars": 5}, overwrite=True))
    assert stats["records"]["in"] > 0


def test_decontamination_drops_and_names_the_eval_doc(corpus, tmp_path):
    rows = [json.loads(ln) for ln in open(corpus / "a.jsonl", encoding="utf-8") if "broken" not in ln]
    leaked = rows[30]["text"]
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text(json.dumps({"id": "test-1", "text": leaked}, ensure_ascii=False) + "\n", encoding="utf-8")
    stats = clean.run(_cfg(tmp_path, corpus, decontam={"paths": [str(evalf)]}))
    assert stats["records"]["dropped"]["contaminated"] == 1
    assert stats["contaminated"]["documents"][0]["eval_id"] == "test-1"
    assert stats["contaminated"]["documents"][0]["id"] == rows[30]["id"]


def test_kill_and_restart_loses_and_duplicates_nothing(reference, corpus, tmp_path):
    out, _ = reference
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptforge", "clean", f"--run_dir={run_dir}", f"--input={corpus}"]
    cmd += ["--workers=1", "--shard_mb=0.004", "--progress=false", "--read.id_field=id"]
    env = {**os.environ, "GPTFORGE_FAULT": "clean_shard_sleep=0.4"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    scan = run_dir / "clean" / "work" / "scan"
    deadline = time.monotonic() + 60
    while len(list(scan.glob("*/stats.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(scan.glob("*/stats.json")))
    assert 2 <= done < len(list(scan.iterdir()))  # killed midway: some shards done, some not
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert _digest(run_dir / "clean") == _digest(out)


def test_cli_help_and_no_torch(tmp_path):
    code = "import sys; from gptforge import cli; cli.main(['clean', '--help']); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--dedup.threshold" in res.stdout and res.stdout.strip().endswith("False")


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        clean.run(_cfg(tmp_path, tmp_path / "nope"))


def test_two_ranks_run_concurrently_and_wait_for_each_other(reference, corpus, tmp_path):
    """Two machines on a shared folder, modelled as two processes started together with the same command."""
    out, _ = reference
    base = [sys.executable, "-m", "gptforge", "clean", f"--run_dir={tmp_path / 'run'}", f"--input={corpus}"]
    base += ["--workers=1", "--shard_mb=0.004", "--progress=false", "--read.id_field=id", "--world_size=2"]
    procs = [subprocess.Popen([*base, f"--rank={r}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert _digest(tmp_path / "run" / "clean") == _digest(out)


def test_boilerplate_and_repeated_lines_and_parquet(tmp_path):
    rng = random.Random(3)
    footer = "本文来源于网络，版权归原作者所有，如有侵权请联系删除。"
    shared = "This long sentence was pasted into two different articles by the same careless editor today."
    docs = [_zh_doc(rng) + "\n" + footer for _ in range(6)] + [_en_doc(rng) for _ in range(4)]
    docs[6] += "\n" + shared
    docs[8] += "\n" + shared
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) for i, t in enumerate(docs)]
    (data / "a.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    stats = clean.run(_cfg(tmp_path, data, output={"format": "parquet"}))
    assert stats["records"]["kept"] == 10 and stats["lines_removed"] == {"boilerplate": 6, "repeated_lines": 1}
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(next((tmp_path / "run" / "clean" / "data").glob("*.parquet"))).to_pylist()
    text = {r["id"]: r["text"] for r in table}
    assert not any(footer in t for t in text.values())
    assert shared in text["d6"] and shared not in text["d8"]  # kept in the first document only
    assert text["d0"] == Normalizer(NormalizeConfig())(docs[0].replace("\n" + footer, ""))[0]
