"""The augment stage end to end: originals then copies, labels kept, counts that balance, config saved, identical
re-runs, no torch; and its refusals (augmented input, bad JSON, missing text, output over input)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge import cli
from gptforge.config import load
from gptforge.data.augment import VALID_OPS
from gptforge.stages import augment

TEXTS = [
    ("这家餐厅的菜非常好吃，服务也很热情。下次还会再来！", "pos"),
    ("今天的电影太无聊了，我看了一半就走了。真是浪费时间。", "neg"),
    ("快递很快就到了，包装完整，东西质量不错。", "pos"),
    ("客服态度很差，问题一直没有解决。", "neg"),
    ("The hotel room was clean and the staff were very friendly. We will come back!", "pos"),
    ("The food was cold and the waiter was rude. I would not recommend it.", "neg"),
    ("Great phone, the battery lasts two days. Very happy with it.", "pos"),
    ("The package arrived broken. Customer service never answered my emails.", "neg"),
]


def write_input(path: Path, records: list[dict], blank_at: int | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if blank_at is not None:
        lines.insert(blank_at, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def train(tmp_path) -> tuple[Path, list[dict]]:
    records = [{"id": i, "text": t, "label": lab, "meta": {"n": i}} for i, (t, lab) in enumerate(TEXTS)]
    records[0]["label"] = 1  # a non-string label is copied as is too
    return write_input(tmp_path / "train.jsonl", records, blank_at=3), records


def cfg_for(tmp_path: Path, src: Path, **kw) -> augment.Config:
    base = {"run_dir": str(tmp_path / "run"), "input": str(src), "augment": {"n_per_record": 3, "seed": 7}}
    base.update(kw)
    return augment.Config.model_validate(base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_end_to_end(tmp_path, train):
    src, records = train
    cfg = cfg_for(tmp_path, src)
    stats = augment.run(cfg)
    out = tmp_path / "run" / "augment"
    rows = read_jsonl(out / "train.jsonl")
    n = len(records)
    assert rows[:n] == records  # originals first, unchanged, in order
    copies = rows[n:]
    assert copies and len(copies) <= 3 * n
    for c in copies:
        src_rec = records[c["augmented_from"]]
        assert c["label"] == src_rec["label"] and c["meta"] == src_rec["meta"] and c["id"] == src_rec["id"]
        assert c["augment_op"] in VALID_OPS and c["text"] != src_rec["text"] and c["text"].strip()
    assert stats["records_in"] == n and stats["blank_lines"] == 1
    assert stats["copies_out"] == len(copies) and stats["records_out"] == len(rows)
    assert sum(v["applied"] for v in stats["ops"].values()) == len(copies)
    assert sum(v["applied"] + v["unchanged"] for v in stats["ops"].values()) == 3 * n
    assert stats["labels_in"] == {"1": 1, "neg": 4, "pos": 3}
    assert sum(stats["labels_copies"].values()) == len(copies)
    sources = stats["synonym_sources"]
    assert sources["builtin"]["words"] > 500 and "words" in sources["mined"] and sources["confusables"] > 300
    assert isinstance(stats["wordnet_available"], bool)
    assert json.loads((out / "stats.json").read_text("utf-8")) == stats
    assert load(augment.Config, out / "config.yaml") == cfg
    ledger = [json.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_text("utf-8").splitlines()]
    assert ledger[-1]["stage"] == "augment" and ledger[-1]["status"] == "ok"
    assert ledger[-1]["metrics"]["copies_out"] == len(copies)


def test_rerun_is_identical_and_seed_matters(tmp_path, train):
    src, _ = train
    augment.run(cfg_for(tmp_path, src))
    first = (tmp_path / "run" / "augment" / "train.jsonl").read_bytes()
    augment.run(cfg_for(tmp_path, src))
    assert (tmp_path / "run" / "augment" / "train.jsonl").read_bytes() == first
    other = tmp_path / "other.jsonl"
    augment.run(cfg_for(tmp_path, src, output=str(other), augment={"n_per_record": 3, "seed": 8}))
    assert other.read_bytes() != first


def test_custom_fields_and_ops(tmp_path):
    records = [{"body": t, "y": lab} for t, lab in TEXTS]
    src = write_input(tmp_path / "in.jsonl", records)
    cfg = cfg_for(tmp_path, src, text_field="body", label_field="y", augment={"ops": ["swap"], "n_per_record": 2})
    stats = augment.run(cfg)
    rows = read_jsonl(tmp_path / "run" / "augment" / "train.jsonl")
    assert set(stats["ops"]) == {"swap"} and all(r["augment_op"] == "swap" for r in rows[len(records) :])
    for r in rows[len(records) :]:
        assert sorted(r["body"]) == sorted(records[r["augmented_from"]]["body"])  # a swap moves characters only
    assert stats["labels_in"] == {"neg": 4, "pos": 4}


def test_refuses_augmented_input(tmp_path, train):
    src, _ = train
    augment.run(cfg_for(tmp_path, src))
    produced = tmp_path / "run" / "augment" / "train.jsonl"
    with pytest.raises(ValueError, match=r"augmented_from.*augmented data"):
        augment.run(cfg_for(tmp_path, produced, output=str(tmp_path / "again.jsonl")))
    assert not (tmp_path / "again.jsonl").exists()


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "fine"}', '{"text": "broken'], ":3: bad JSON"),
        (['{"text": "ok"}', '["not", "an", "object"]'], ":2: expected a JSON object"),
        (['{"text": "ok"}', '{"body": "no text"}'], ":2: text field 'text' is missing"),
        (['{"text": 5}'], ":1: text field 'text' is a int"),
        (['{"text": "a"}', '{"text": "b", "augmented_from": 0}'], ":2: record already carries 'augmented_from'"),
        (["", "  "], ": no records"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, lines, message):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{src}{message}".replace("[", r"\[")):
        augment.run(cfg_for(tmp_path, src))
    assert not (tmp_path / "run" / "augment").exists()  # nothing written for a bad input


def test_refuses_missing_input_and_output_over_input(tmp_path, train):
    src, _ = train
    with pytest.raises(ValueError, match="set --input"):
        augment.run(cfg_for(tmp_path, src, input=""))
    with pytest.raises(ValueError, match="is not a file"):
        augment.run(cfg_for(tmp_path, tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="is the input file"):
        augment.run(cfg_for(tmp_path, src, output=str(src)))
    with pytest.raises(ValueError, match="valid ones"):
        cfg_for(tmp_path, src, augment={"ops": ["backtranslate"]})


def test_docstring_says_training_split_only():
    doc = augment.__doc__
    assert "TRAINING split only" in doc and "never be augmented" in doc and "finetune" in doc


def test_cli_runs_it_without_torch(tmp_path, train, monkeypatch):
    src, _ = train
    monkeypatch.setitem(cli.STAGES, "augment", "gptforge.stages.augment")  # the integrator registers it
    assert cli.main(["augment", f"--run_dir={tmp_path / 'cli'}", f"--input={src}", "--augment.n_per_record=1"]) == 0
    assert (tmp_path / "cli" / "augment" / "train.jsonl").is_file()
    assert cli.main(["augment", f"--run_dir={tmp_path / 'cli'}", f"--input={tmp_path / 'nope.jsonl'}"]) == 2
    code = (
        "import sys; from gptforge.stages import augment as a; "
        f"a.run(a.Config(run_dir={str(tmp_path / 'sub')!r}, input={str(src)!r})); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
