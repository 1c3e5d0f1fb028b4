"""The clean stage on odd layouts and at awkward moments: colliding relative paths, outputs inside the input,
steps out of order, settings and evaluation files changed between runs, kills during clean-up, duplicated jobs,
one big compressed file (memory), and how often the dedup step reads each shard's ids."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from gptforge.data import clean_io, pipeline
from gptforge.data.sources import discover
from gptforge.stages import clean
from tests.stages.test_clean import _digest

_R = random.Random(0)
WORDS = ["".join(_R.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_R.randint(3, 9))) for _ in range(400)]


def _tag(i: int) -> str:
    return "doc" + "".join("abcdefghij"[int(c)] for c in str(i))


def _doc(rng: random.Random, n: int = 40, tag: str = "") -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + (f" {tag}" if tag else "")


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _cfg(run: Path, inputs: list[Path], **kw) -> clean.Config:
    base = {"run_dir": str(run), "input": [str(p) for p in inputs], "workers": 1, "progress": False}
    base["shard_mb"] = 0.004
    base.update(kw)
    return clean.Config.model_validate(base)


def _kept_texts(out: Path) -> list[str]:
    return [json.loads(ln)["text"] for p in sorted((out / "data").glob("*.jsonl")) for ln in open(p, encoding="utf-8")]


def test_same_relative_path_under_two_inputs_is_counted_per_file(tmp_path):
    """Two input folders that both hold x.txt: the binary one must be counted as skipped, not merged into the other."""
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "x.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "B" / "x.txt").write_text(_doc(random.Random(0)), encoding="utf-8")
    stats = clean.run(_cfg(tmp_path / "run", [tmp_path / "A", tmp_path / "B"]))
    assert stats["files"] == {"in": 2, "ok": 1, "skipped": {"binary": 1}, "quarantined": {}}
    assert stats["records"]["kept"] == 1
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "clean" / "files.jsonl", encoding="utf-8")]
    assert sorted(r.get("status") for r in rows) == ["ok", "skipped"]


def test_second_run_in_one_process_uses_its_own_boilerplate_tables(tmp_path):
    """Line tables cached by folder name leaked from one run into the next one in the same run_dir."""
    rng = random.Random(1)
    line = "Copyright 2024 Example Corporation all rights reserved worldwide forever and ever"
    data = _jsonl(tmp_path / "in" / "d.jsonl", [_doc(rng, tag=_tag(i)) + "\n" + line for i in range(12)])
    first = clean.run(_cfg(tmp_path / "run", [data]))
    assert first["lines_removed"] == {"boilerplate": 12}
    second = clean.run(_cfg(tmp_path / "run", [data], boilerplate={"enabled": False}, overwrite=True))
    # without boilerplate removal the line is a repeated line: kept in its first document, removed from the other 11
    assert second["lines_removed"] == {"repeated_lines": 11}
    assert sum(line in t for t in _kept_texts(tmp_path / "run" / "clean")) == 1


def test_finished_run_without_work_folder_does_not_mix_with_the_next(tmp_path):
    """keep_work=false deleted the plan too, so a run with other input wrote over part of the old output."""
    rng = random.Random(2)
    texts = [_doc(rng, tag=_tag(i)) for i in range(60)]
    data = _jsonl(tmp_path / "in" / "d.jsonl", texts)
    clean.run(_cfg(tmp_path / "run", [data], output={"keep_work": False}))
    _jsonl(data, texts[:10])
    with pytest.raises(ValueError, match="different"):
        clean.run(_cfg(tmp_path / "run", [data], output={"keep_work": False}))
    stats = clean.run(_cfg(tmp_path / "run", [data], output={"keep_work": False}, overwrite=True))
    assert stats["records"]["kept"] == 10
    assert sorted(_kept_texts(tmp_path / "run" / "clean")) == sorted(texts[:10])


def test_kill_while_deleting_the_work_folder_then_rerun(tmp_path, monkeypatch):
    """A kill part-way through removing work/ (keep_work=false) must not leave a run that cannot finish."""
    rng = random.Random(3)
    texts = [_doc(rng, tag=_tag(i)) for i in range(40)] * 2
    data = _jsonl(tmp_path / "in" / "d.jsonl", texts)
    ref = tmp_path / "ref"
    clean.run(_cfg(ref, [data]))
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *a, **kw):
        # delete some files of the dedup step and of one shard, then die like a SIGKILL would
        path = Path(path)
        for p in sorted(path.rglob("*.npy"))[:3] + sorted(path.rglob("dedup/stats.json")):
            p.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(clean.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        clean.run(_cfg(tmp_path / "run", [data], output={"keep_work": False}))
    monkeypatch.setattr(clean.shutil, "rmtree", real_rmtree)
    clean.run(_cfg(tmp_path / "run", [data], output={"keep_work": False}))
    assert _digest(tmp_path / "run" / "clean") == _digest(ref / "clean")


def test_run_dir_inside_the_input_folder_is_not_read_back(tmp_path):
    rng = random.Random(4)
    _jsonl(tmp_path / "corpus" / "d.jsonl", [_doc(rng, tag=_tag(i)) for i in range(30)])
    cfg = _cfg(tmp_path / "corpus" / "runs", [tmp_path / "corpus"])
    first = clean.run(cfg)
    again = clean.run(cfg)  # the first run's outputs are not inputs now: nothing changed, nothing refused
    assert again["records"] == first["records"] and again["files"]["in"] == 1


@pytest.mark.parametrize("step", ["dedup", "write", "report"])
def test_step_out_of_order_on_one_machine_is_an_error_not_a_wait(tmp_path, step):
    _jsonl(tmp_path / "in" / "d.jsonl", [_doc(random.Random(5))])
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"--step"):
        clean.run(_cfg(tmp_path / "run", [tmp_path / "in"], step=step, wait_timeout_s=3))
    assert time.monotonic() - t0 < 2


def test_changed_evaluation_file_is_refused(tmp_path):
    rng = random.Random(6)
    texts = [_doc(rng, tag=_tag(i)) for i in range(20)]
    data = _jsonl(tmp_path / "in" / "d.jsonl", texts)
    evalf = _jsonl(tmp_path / "eval" / "e.jsonl", [texts[3]])
    cfg = _cfg(tmp_path / "run", [data], decontam={"paths": [str(evalf)]})
    assert clean.run(cfg)["records"]["dropped"] == {"contaminated": 1}
    _jsonl(evalf, [texts[3], texts[4]])
    with pytest.raises(ValueError, match="evaluation"):
        clean.run(cfg)


def test_a_duplicated_job_on_the_same_shard_does_not_crash_or_corrupt(tmp_path, monkeypatch):
    """Two processes on one shard (a scheduler retry while the old job still runs, or ranks with different
    world sizes) used the same temporary names: one deleted or truncated the other's files."""
    rng = random.Random(7)
    data = _jsonl(tmp_path / "in" / "d.jsonl", [_doc(rng, tag=_tag(i)) for i in range(8)] + ["short"])
    cfg = _cfg(tmp_path / "run", [data], shard_mb=1, step="scan")
    clean.run(cfg)  # makes the plan; one shard
    out = tmp_path / "run" / "clean"
    ref = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.jsonl") if "scan" in p.parts}
    ref |= {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "rejects").rglob("*.jsonl")}
    shutil.rmtree(out / "work" / "scan")
    files = [f for f in discover([str(data)])]
    shards = pipeline.plan_shards(files, cfg.read, 2**20)
    monkeypatch.setenv("GPTFORGE_FAULT", "clean_shard_sleep=0.4")
    errors = []

    def job():
        try:
            pipeline.scan_shard(0, shards[0], files, cfg.settings().model_dump_json(), out)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=job), threading.Thread(target=job)]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.jsonl") if "scan" in p.parts}
    got |= {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "rejects").rglob("*.jsonl")}
    assert got == ref


def _dedup_reads(tmp_path: Path, n_docs: int) -> tuple[int, int]:
    rng = random.Random(8)
    texts = [_doc(rng, n=12, tag=_tag(i)) for i in range(n_docs)]
    copies = texts[:]
    rng.shuffle(copies)
    data = _jsonl(tmp_path / "in" / "d.jsonl", texts + copies)
    cfg = _cfg(tmp_path / "run", [data], shard_mb=0.01, step="scan", dedup={"near": False})
    clean.run(cfg)
    out = tmp_path / "run" / "clean"
    n_shards = len(list((out / "work" / "scan").iterdir()))
    opened: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], str) and "/work/scan/" in args[0]:
            opened.append(args[0])

    sys.addaudithook(hook)
    try:
        stats = pipeline.dedup_all(n_shards, cfg.settings().model_dump_json(), out)
    finally:
        active[0] = False
    assert stats["exact_duplicate"] == n_docs
    per_file: dict[str, int] = {}
    for p in opened:
        per_file[p] = per_file.get(p, 0) + 1
    return n_shards, max(per_file.values())


def test_dedup_reads_each_shard_file_a_bounded_number_of_times(tmp_path):
    """Resolving `dup_of` ids re-read a shard's id list for nearly every duplicate: O(duplicates x shard size)."""
    n_shards, most = _dedup_reads(tmp_path, 600)
    assert n_shards >= 10
    assert most <= 3, f"a shard file was opened {most} times"


def _write_peak(tmp_path: Path, n_docs: int, fmt: str) -> float:
    rng = random.Random(9)
    folder = tmp_path / f"in{n_docs}"
    folder.mkdir()
    with gzip.open(folder / "big.jsonl.gz", "wt", encoding="utf-8") as fh:  # compressed: one shard however big
        for i in range(n_docs):
            fh.write(json.dumps({"text": _doc(rng, n=150, tag=_tag(i))}) + "\n")
    run = tmp_path / f"run{n_docs}"
    cfg = _cfg(run, [folder], shard_mb=1, dedup={"near": False}, output={"format": fmt}, step="scan")
    clean.run(cfg)
    clean.run(cfg.model_copy(update={"step": "dedup"}))
    tracemalloc.start()
    try:
        pipeline.write_shard(0, cfg.settings().model_dump_json(), run / "clean", 0)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_write_step_memory_does_not_grow_with_a_big_compressed_file(tmp_path, fmt, monkeypatch):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
        monkeypatch.setattr(clean_io, "PARQUET_ROWS", 100)  # row groups smaller than the small corpus
    small, big = _write_peak(tmp_path, 500, fmt), _write_peak(tmp_path, 3000, fmt)
    assert big < 1.5 * small + 1, (small, big)


def _messy(folder: Path) -> Path:
    """Kept docs, a too-short doc, a broken line, exact copies: every kind of output file for each shard."""
    rng = random.Random(10)
    texts = [_doc(rng, tag=_tag(i)) for i in range(24)]
    lines = [json.dumps({"text": t}) for t in texts + texts[:6] + ["tiny"]]
    lines.insert(5, '{"text": "unterminated')
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "step,kill_at", [("scan", 2), ("scan", 4), ("dedup", 3), ("write", 1), ("write", 2), ("report", 2)]
)
def test_kill_between_renames_of_a_shard_then_rerun(tmp_path, monkeypatch, step, kill_at):
    """Some of a shard's files renamed into place, the others and the marker not: the redo must end byte-identical."""
    data = _messy(tmp_path / "in")
    clean.run(_cfg(tmp_path / "ref", [data], shard_mb=0.002))
    real_replace = clean_io.os.replace
    calls = [0]

    def dying_replace(src, dst):
        calls[0] += 1
        if calls[0] == kill_at:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs
        real_replace(src, dst)

    steps = ["scan", "dedup", "write", "report"]
    for before in steps[: steps.index(step)]:
        clean.run(_cfg(tmp_path / "run", [data], shard_mb=0.002, step=before))
    monkeypatch.setattr(clean_io.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        clean.run(_cfg(tmp_path / "run", [data], shard_mb=0.002, step=step))
    monkeypatch.setattr(clean_io.os, "replace", real_replace)
    stats = clean.run(_cfg(tmp_path / "run", [data], shard_mb=0.002))
    assert _digest(tmp_path / "run" / "clean") == _digest(tmp_path / "ref" / "clean")
    r = stats["records"]
    assert r["in"] == r["kept"] + sum(r["dropped"].values()) + sum(r["deduplicated"].values()) + 1  # + the bad line


def test_ranks_with_other_world_size_or_settings_wait_and_fail_clearly(tmp_path):
    data = _messy(tmp_path / "in")
    clean.run(_cfg(tmp_path / "run", [data], rank=0, world_size=2, step="scan"))
    with pytest.raises(TimeoutError, match="world_size 2, this rank 3"):
        clean.run(_cfg(tmp_path / "run", [data], rank=1, world_size=3, step="scan", wait_timeout_s=0.6))
    with pytest.raises(TimeoutError, match=r"different settings \(filters.min_chars\)"):
        clean.run(
            _cfg(
                tmp_path / "run",
                [data],
                rank=1,
                world_size=2,
                step="scan",
                wait_timeout_s=0.6,
                filters={"min_chars": 5},
            )
        )
    assert not (tmp_path / "run" / "clean" / "work" / "scan" / "part-00001").exists()  # the odd ranks did nothing


def test_huge_line_in_a_split_file_is_one_record(tmp_path):
    """A 1.5 MB line inside a jsonl that is cut into 0.1 MB shards: one record, counted once, line numbers exact."""
    rng = random.Random(11)
    huge = " ".join(rng.choice(WORDS) for _ in range(250_000))
    texts = [_doc(rng, tag=_tag(i)) for i in range(1200)]
    texts.insert(900, huge)
    data = _jsonl(tmp_path / "in" / "big.jsonl", texts)
    stats = clean.run(_cfg(tmp_path / "run", [data], shard_mb=0.1, filters={"max_chars": 1_000_000}))
    assert stats["shards"] >= 4
    r = stats["records"]
    assert r["in"] == 1201 and r["dropped"] == {"too_long": 1} and r["kept"] == 1200
    rej = [json.loads(ln) for ln in open(next((tmp_path / "run" / "clean" / "rejects").rglob("*.jsonl")))]
    assert [(x["source"], x["line"], len(x["text"])) for x in rej] == [("big.jsonl", 901, len(huge))]
