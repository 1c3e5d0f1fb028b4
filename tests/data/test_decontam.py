import json

import numpy as np
import pytest

from gptforge.data.decontam import DecontamConfig, Decontaminator
from gptforge.data.sources import InputConfig
from gptforge.data.text import units

RNG = np.random.default_rng(0)
ZH = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
EN = [f"w{i}" for i in range(5000)]


def _zh(n: int) -> str:
    return "".join(RNG.choice(ZH, n))


def _en(n: int) -> str:
    return " ".join(RNG.choice(EN, n))


@pytest.fixture(scope="module")
def evals():
    return {"q1": _zh(80), "q2": _en(60), "q3": _zh(40), "short": "巴黎是法国首都"}  # "short" has 7 < 13 units


@pytest.fixture(scope="module")
def deco(evals):
    return Decontaminator.from_texts(DecontamConfig(ngram=13), evals.items())


def test_exact_copy_is_caught(deco, evals):
    assert deco.n_eval_docs == 4
    hit = deco.check(evals["q2"])
    assert hit == {"eval_id": "q2", "ngrams": 60 - 13 + 1, "exact": True}
    assert deco.check(evals["short"]) == {"eval_id": "short", "ngrams": 0, "exact": True}


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_embedded_20_unit_span_is_caught(deco, evals, lang):
    key, sep, fill = ("q1", "", _zh) if lang == "zh" else ("q2", " ", _en)
    span = sep.join(units(evals[key])[30:50])
    text = fill(200) + sep + span + sep + fill(200)
    hit = deco.check(text)
    assert hit is not None and hit["eval_id"] == key and not hit["exact"]
    assert hit["ngrams"] == 20 - 13 + 1


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_12_shared_units_are_not_enough(deco, evals, lang):
    key, sep, fill = ("q1", "", _zh) if lang == "zh" else ("q2", " ", _en)
    span = sep.join(units(evals[key])[10:22])
    assert deco.check(fill(100) + sep + span + sep + fill(100)) is None
    assert deco.check(fill(100) + sep + sep.join(units(evals[key])[10:23]) + sep + fill(100)) is not None


def test_case_punctuation_and_spacing_do_not_hide_overlap(deco, evals):
    words = units(evals["q2"])[:15]
    disguised = "Intro. " + ", ".join(w.upper() for w in words[:8]) + "!\n\n" + "  ".join(words[8:]) + " -- end"
    assert deco.check(disguised)["eval_id"] == "q2"
    chars = units(evals["q1"])[5:25]
    assert deco.check("前言：" + "，".join(chars) + "。")["eval_id"] == "q1"


def test_short_eval_doc_only_matches_exactly(deco, evals):
    assert deco.check("我们都知道" + evals["short"] + "，这是常识。") is None


def test_reports_the_eval_doc_with_most_overlap(evals):
    a, b = _zh(60), _zh(60)
    d = Decontaminator.from_texts(DecontamConfig(ngram=13), [("a", a), ("b", b + a[:20])])
    assert d.check(a[:30] + _zh(50))["eval_id"] == "a"  # 18 n-grams in a, 8 of them also in b
    assert d.check(b[:40] + a[:14])["eval_id"] == "b"


def test_check_batch_equals_check(deco, evals):
    texts = [evals["q1"], _zh(50), evals["q2"][:200] + " tail", "", "...", evals["short"], _en(30) + evals["q3"]]
    assert deco.check_batch(texts) == [deco.check(t) for t in texts]
    assert sum(r is not None for r in deco.check_batch(texts)) == 4


def test_empty_index_flags_nothing():
    d = Decontaminator(DecontamConfig(), InputConfig())
    assert d.n_eval_docs == 0 and d.check("anything at all " * 10) is None


def test_reads_eval_files_and_applies_normalize(tmp_path):
    q = _en(30)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "test.jsonl").write_text(
        json.dumps({"text": q.replace("w1", "W-1"), "qid": "Q7"}) + "\n" + "{broken\n", encoding="utf-8"
    )
    (tmp_path / "eval" / "notes.txt").write_text(
        "静夜思 床前明月光，疑是地上霜。举头望明月，低头思故乡。", encoding="utf-8"
    )
    cfg = DecontamConfig(paths=[str(tmp_path / "eval")], ngram=13)
    d = Decontaminator(cfg, InputConfig(id_field="qid"), normalize=lambda text, fmt: text.replace("W-1", "w1"))
    assert d.n_eval_docs == 2 and d.eval_ids == ["notes.txt", "Q7"]
    assert len(d.skipped) == 1 and "test.jsonl:2" in d.skipped[0] and "invalid_json" in d.skipped[0]
    assert d.check("prefix " + q + " suffix")["eval_id"] == "Q7"  # matches only after normalization
    assert d.check("床前明月光，疑是地上霜。举头望明月")["eval_id"] == "notes.txt"
    # a Normalizer returns (text, steps); that works too
    d2 = Decontaminator(cfg, InputConfig(id_field="qid"), normalize=lambda text, fmt: (text.replace("W-1", "w1"), []))
    assert d2.check(q)["eval_id"] == "Q7"


def test_unusable_eval_files_are_errors(tmp_path):
    (tmp_path / "bad.txt").write_bytes("Über Größe und Maße: schön fährt Müller.".encode("cp1252"))
    with pytest.raises(ValueError, match=r"decontam.paths.*bad.txt.*encoding_unknown"):
        Decontaminator(DecontamConfig(paths=[str(tmp_path / "bad.txt")]), InputConfig())
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no evaluation documents"):
        Decontaminator(DecontamConfig(paths=[str(tmp_path / "empty.jsonl")]), InputConfig())
    with pytest.raises(ValueError):
        Decontaminator(DecontamConfig(paths=[str(tmp_path / "missing")]), InputConfig())


def test_config_is_strict():
    with pytest.raises(ValueError, match="ngram"):
        DecontamConfig(ngram=0)
    with pytest.raises(ValueError, match="action"):
        DecontamConfig(action="delete")
    with pytest.raises(ValueError, match="extra"):
        DecontamConfig(n=13)
