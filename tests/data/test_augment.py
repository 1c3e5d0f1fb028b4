"""Text augmentation: each operation does what it says on Chinese and English, protected spans and labels never
change, output is deterministic per (seed, record, copy), tables parse (and fail) by line, mining finds a planted
synonym pair and nothing unrelated, fast enough on a megabyte of text."""

from __future__ import annotations

import copy
import random
import re
import string
import sys
import time
import types
from collections import Counter

import pytest

from gptforge import sample_data_dir
from gptforge.data.augment import VALID_OPS, AugmentConfig, Augmenter, keyboard_neighbors, segment, tables_dir
from gptforge.data.synonyms import STOPWORDS, load_synonym_table, mine_synonyms, wordnet_available, wordnet_synonyms

ZH = "今天天气很好，我们去公园散步吧！你想一起去吗？我觉得这个电影非常有趣。"
EN = "The quick brown fox jumps over the lazy dog. It was a happy day! Did you see the big house?"
TABLE = """# test table
big\tlarge\thuge
happy, glad, cheerful
house home
quick fast
电影 影片
有趣 好玩
公园 花园
散步 漫步
"""
SEEDS = range(25)


def en_words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text)


def is_subsequence(short, long) -> bool:
    it = iter(long)
    return all(x in it for x in short)


@pytest.fixture
def table_path(tmp_path):
    p = tmp_path / "syn.tsv"
    p.write_text(TABLE, encoding="utf-8")
    return p


@pytest.fixture
def aug(table_path) -> Augmenter:
    """Only the user table (p small enough that synonym/insert/swap touch exactly one word)."""
    cfg = AugmentConfig(synonym_table=str(table_path), builtin_tables=False, mine_synonyms=False, wordnet="off", p=0.05)
    return Augmenter(cfg)


def run_op(a: Augmenter, text: str, op: str, seed: int) -> str:
    new, used = a.augment(text, random.Random(seed), op)
    assert used == op
    return new


def test_config_rejects_unknown_and_repeated_ops():
    with pytest.raises(ValueError, match="valid ones: synonym, insert, swap, delete, reorder, char_noise"):
        AugmentConfig(ops=["synonym", "shuffle"])
    with pytest.raises(ValueError, match="twice"):
        AugmentConfig(ops=["swap", "swap"])
    with pytest.raises(ValueError, match="empty"):
        AugmentConfig(ops=[])
    assert AugmentConfig().ops == list(VALID_OPS)


def test_segment_round_trips_and_protects():
    text = "<|user|>见 https://a.cn/x?y=1，邮件 me@b.com 共 3.5 元。Don't stop!\n[SEP] 三个人"
    toks = segment(text)
    assert "".join(t.text for t in toks) == text
    kinds = {t.text: t.kind for t in toks}
    assert kinds["<|user|>"] == kinds["[SEP]"] == "fence"
    assert kinds["https://a.cn/x?y=1"] == kinds["me@b.com"] == kinds["3"] == "fixed"
    assert kinds["Don't"] == kinds["邮件"] == "word"


def test_swap_keeps_the_words(aug):
    for seed in SEEDS:
        new = run_op(aug, EN, "swap", seed)
        assert new != EN and sorted(en_words(new)) == sorted(en_words(EN))
        new = run_op(aug, ZH, "swap", seed)
        assert new != ZH and Counter(new) == Counter(ZH)
        assert [c for c in new if c in "，！？。"] == [c for c in ZH if c in "，！？。"]  # punctuation stays put


def test_delete_shrinks(aug):
    for seed in SEEDS:
        new = run_op(aug, EN, "delete", seed)
        assert len(en_words(new)) < len(en_words(EN)) and is_subsequence(en_words(new), en_words(EN))
        assert "  " not in new and new == new.strip() and not re.search(r" [.,!?]", new)  # no orphaned spaces
        new = run_op(aug, ZH, "delete", seed)
        assert len(new) < len(ZH) and is_subsequence(new, ZH)
        assert Counter(c for c in new if c in "，！？。") == Counter(c for c in ZH if c in "，！？。")


def _group_words(table: dict[str, list[str]], text_words: list[str]) -> set[str]:
    return {w for k in text_words for w in table.get(k.lower(), [])}


def test_insert_adds_a_table_synonym(aug, table_path):
    table = load_synonym_table(table_path)
    allowed = _group_words(table, en_words(EN))
    for seed in SEEDS:
        new = run_op(aug, EN, "insert", seed)
        extra = Counter(w.lower() for w in en_words(new)) - Counter(w.lower() for w in en_words(EN))
        assert sum(extra.values()) == 1 and set(extra) <= allowed
        assert is_subsequence(en_words(EN), en_words(new)) and "  " not in new
        new = run_op(aug, ZH, "insert", seed)
        zh_allowed = [w for k in table for w in table[k] if k in ZH]
        assert any(new[:i] + new[i + len(w) :] == ZH for w in zh_allowed for i in range(len(new))), new


def test_synonym_replaces_with_a_table_entry(aug, table_path):
    table = load_synonym_table(table_path)
    for seed in SEEDS:
        new = run_op(aug, EN, "synonym", seed)
        changed = [(a, b) for a, b in zip(en_words(EN), en_words(new)) if a != b]
        assert len(en_words(new)) == len(en_words(EN)) and len(changed) == 1
        a, b = changed[0]
        assert b.lower() in table[a.lower()] and b[0].isupper() == a[0].isupper()
        new = run_op(aug, ZH, "synonym", seed)
        options = {ZH.replace(w, s, 1) for w in table if w in ZH for s in table[w]}
        assert new in options


def zh_sentences(text: str) -> list[str]:
    return re.findall(r"[^。！？]+[。！？]", text)


def en_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.findall(r"[^.!?]+[.!?]", text)]


def test_reorder_keeps_the_sentences(aug):
    lines = "第一行没有句号\n第二行也没有\n第三行"
    for seed in SEEDS:
        new = run_op(aug, ZH, "reorder", seed)
        assert new != ZH and sorted(zh_sentences(new)) == sorted(zh_sentences(ZH)) and len(new) == len(ZH)
        new = run_op(aug, EN, "reorder", seed)
        assert new != EN and sorted(en_sentences(new)) == sorted(en_sentences(EN)) and len(new) == len(EN)
        new = run_op(aug, lines, "reorder", seed)
        assert new != lines and sorted(new.split("\n")) == sorted(lines.split("\n"))
    # decimals, URLs and abbreviations inside a sentence do not split it
    assert run_op(aug, "Pi is 3.14 here, see https://x.org/a.b for more.", "reorder", 0).startswith("Pi is 3.14")


def test_reorder_leaves_one_sentence_unchanged(aug):
    for text in ("只有一句话。", "One sentence only."):
        assert run_op(aug, text, "reorder", 0) == text
    a = Augmenter(AugmentConfig(ops=["reorder"], mine_synonyms=False, wordnet="off"))
    copies, stats = a.augment_records([{"text": "只有一句话。", "label": 1}])
    assert copies == [] and stats["ops"]["reorder"] == {"applied": 0, "unchanged": 4}


def is_typo(a: str, b: str, keys: dict[str, str]) -> bool:
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return b[diff[0]].lower() in keys[a[diff[0]].lower()]
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    if len(b) == len(a) - 1:
        return any(a[:i] + a[i + 1 :] == b for i in range(len(a)))
    if len(b) == len(a) + 1:
        return any(a[: i + 1] + a[i] + a[i + 1 :] == b for i in range(len(a)))
    return False


def test_keyboard_map_is_qwerty_and_symmetric():
    keys = keyboard_neighbors()
    assert set(keys["s"]) == set("adwezx") and set(keys["p"]) == set("ol") and len(keys) == 26
    assert all(a in keys[b] for a in keys for b in keys[a])


def test_char_noise_uses_the_confusion_table_and_keyboard(aug):
    keys = keyboard_neighbors()
    table = load_synonym_table(tables_dir() / "zh_confusables.txt")
    assert aug.confusables and all(len(c) == 1 for c in aug.confusables)
    for seed in SEEDS:
        new = run_op(aug, ZH, "char_noise", seed)
        diff = [i for i in range(len(ZH)) if new[i] != ZH[i]]
        assert len(new) == len(ZH) and diff and all(new[i] in table[ZH[i]] for i in diff)
        new = run_op(aug, EN, "char_noise", seed)
        pairs = [(a, b) for a, b in zip(en_words(EN), en_words(new)) if a != b]
        assert len(en_words(new)) == len(en_words(EN)) and pairs
        assert all(is_typo(a, b, keys) for a, b in pairs), pairs


PROTECTED_EN = (
    "<|user|>Visit https://example.com/a.b?x=1 or write to me@example.org about order 12345. "
    "<|assistant|>Sure, the total is 3.14 dollars. I will check it soon."
)
PROTECTED_ZH = (
    "<|user|>请访问https://example.cn/p?id=7或发邮件到kf@example.cn，订单号20240101。"
    "<|assistant|>好的，总价是3.14元。我马上去查一下。"
)
LITERALS = ["<|user|>", "<|assistant|>", "https://example.com/a.b?x=1", "me@example.org", "https://example.cn/p?id=7"]
LITERALS += ["kf@example.cn"]
SPECIAL = re.compile(r"<\|[a-z]+\|>")


@pytest.mark.parametrize("text", [PROTECTED_EN, PROTECTED_ZH], ids=["en", "zh"])
def test_protected_spans_and_digits_are_never_changed(text):
    a = Augmenter(AugmentConfig(p=0.5, wordnet="off"), corpus=[text] * 10)
    for op in VALID_OPS:
        for seed in range(30):
            new = run_op(a, text, op, seed)
            assert new.strip()
            for lit in LITERALS:
                assert new.count(lit) == text.count(lit), (op, lit, new)
            assert sorted(re.findall(r"\d+", new)) == sorted(re.findall(r"\d+", text)), (op, new)
            assert SPECIAL.findall(new) == SPECIAL.findall(text)  # fences keep their order
            if op in ("swap", "reorder"):  # nothing crosses a fence
                assert [Counter(s) for s in SPECIAL.split(new)] == [Counter(s) for s in SPECIAL.split(text)]


def test_never_empty():
    a = Augmenter(AugmentConfig(p=1.0, wordnet="off", mine_synonyms=False))
    for text in ("好", "Hi", "!!!", "<|user|>", "12 34", "Hi there", "你好世界", "   "):
        for op in VALID_OPS:
            for seed in range(5):
                new = run_op(a, text, op, seed)
                assert new.strip() or new == text
    assert run_op(a, "Hi there", "delete", 0) in ("Hi", "there")
    assert a.augment("", random.Random(0), "delete") == ("", "delete")


RECORDS = [
    {"text": ZH, "label": "pos", "id": 0},
    {"text": EN, "label": "neg", "id": 1, "meta": {"src": "x"}},
    {"text": "这家餐厅的服务很差。菜也不好吃，我不会再来了。", "label": "neg", "id": 2},
    {"text": "What a wonderful movie! The actors were great. I would watch it again.", "label": ["a", "b"], "id": 3},
    {"text": "好", "label": 0, "id": 4},
]


def make(seed: int = 1, **kw) -> Augmenter:
    return Augmenter(AugmentConfig(seed=seed, wordnet="off", **kw), corpus=[r["text"] for r in RECORDS])


def test_records_are_deterministic_per_seed():
    first, stats = make(1).augment_records(copy.deepcopy(RECORDS))
    again, _ = make(1).augment_records(copy.deepcopy(RECORDS))
    other, _ = make(2).augment_records(copy.deepcopy(RECORDS))
    assert first == again and first != other
    total = sum(v["applied"] + v["unchanged"] for v in stats["ops"].values())
    assert total == len(RECORDS) * 4 and sum(v["applied"] for v in stats["ops"].values()) == len(first)


def test_copy_depends_only_on_seed_index_copy_and_text():
    a = make(3, mine_synonyms=False)
    base, _ = a.augment_records(RECORDS)
    changed = [dict(r, text=r["text"] + " 附加") if i != 3 else r for i, r in enumerate(RECORDS)]
    alt, _ = a.augment_records(changed)
    assert [c for c in base if c["augmented_from"] == 3] == [c for c in alt if c["augmented_from"] == 3]
    # the same copies through the single-text API, after unrelated calls, drawn in reverse order
    src = RECORDS[3]["text"]
    drawn = {}
    for j in reversed(range(4)):
        a.augment(EN, random.Random(j))
        drawn[j] = a.augment(src, a.copy_rng(3, j, src))
    expected, seen = [], {src}
    for j in range(4):
        if drawn[j][0] not in seen:
            seen.add(drawn[j][0])
            expected.append(drawn[j])
    assert [(c["text"], c["augment_op"]) for c in base if c["augmented_from"] == 3] == expected


def test_labels_and_other_fields_untouched():
    records = copy.deepcopy(RECORDS)
    copies, _ = make(5, n_per_record=8).augment_records(records)
    assert records == RECORDS  # the input is not mutated
    assert copies
    seen = set()
    for c in copies:
        src = RECORDS[c["augmented_from"]]
        assert {k: v for k, v in c.items() if k not in ("text", "augmented_from", "augment_op")} == {
            k: v for k, v in src.items() if k != "text"
        }
        assert c["text"] != src["text"] and c["text"].strip() and c["augment_op"] in VALID_OPS
        assert (c["augmented_from"], c["text"]) not in seen
        seen.add((c["augmented_from"], c["text"]))


def test_records_need_a_text_field():
    with pytest.raises(ValueError, match="record 1: field 'text'"):
        make().augment_records([{"text": "ok"}, {"body": "no text"}])


# ---------------------------------------------------------------------------------------------------------- tables


def test_table_parsing(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(
        "\ufeff# comment line\n\nbig\tlarge\thuge\t\nhappy, glad，cheerful\n快乐 愉快 开心   # trailing comment\n"
        "ice cream\tgelato\nBig bulky\nC# csharp\n",
        encoding="utf-8",
    )
    t = load_synonym_table(p)
    assert t["big"] == ["large", "huge", "bulky"] and t["bulky"] == ["Big"]
    assert t["glad"] == ["happy", "cheerful"] and t["快乐"] == ["愉快", "开心"]
    assert t["ice cream"] == ["gelato"] and t["c#"] == ["csharp"]


@pytest.mark.parametrize(
    "content, where",
    [
        (b"big large\nlonely\n", ":2:"),
        (b"big large\n\nfoo, foo\n", ":3:"),
        (b"big large\nabc \xff\xfe def\n", ":2:"),
        (b"big large\nroom101 chamber\n", ":2:"),
        (b"# only a comment\n\n", ": no synonym groups"),
    ],
)
def test_table_errors_name_file_and_line(tmp_path, content, where):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{p}{where}")):
        load_synonym_table(p)


def test_missing_table_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read synonym table"):
        Augmenter(AugmentConfig(synonym_table=str(tmp_path / "nope.txt")))


def test_bundled_tables_are_sizeable_and_documented():
    for name, size in (("zh_synonyms.txt", 250), ("en_synonyms.txt", 250), ("zh_confusables.txt", 200)):
        path = tables_dir() / name
        head = path.read_text("utf-8")[:600]
        assert "hand-written for gptforge" in head
        lines = [x for x in path.read_text("utf-8").splitlines() if x.strip() and not x.startswith("#")]
        assert len(lines) >= size, name
        load_synonym_table(path)  # parses
    conf = load_synonym_table(tables_dir() / "zh_confusables.txt")
    for a, b in (("己", "已"), ("己", "巳"), ("在", "再"), ("的", "地"), ("的", "得"), ("未", "末")):
        assert b in conf[a]


# ---------------------------------------------------------------------------------------------------------- mining


def planted_corpus(vocab: list[str], n_groups: int = 30, n_sent: int = 6000, seed: int = 0) -> tuple[list, list]:
    """Sentences `c c T c c` whose context words c come from the target's group. Group 0's target is either of the
    planted pair, so those two share one context distribution; other targets share no context with each other."""
    rng = random.Random(seed)
    ctx = [vocab[g * 7 : g * 7 + 6] for g in range(n_groups)]
    targets = [vocab[g * 7 + 6] for g in range(n_groups)]
    docs = []
    for _ in range(n_sent // 10):
        sents = []
        for _ in range(10):
            g = rng.randrange(n_groups)
            t = rng.choice(PAIR[" "]) if g == 0 else targets[g]
            words = [rng.choice(ctx[g]) for _ in range(4)]
            sents.append(" ".join([*words[:2], t, *words[2:]]) + ".")
        docs.append(" ".join(sents))
    return docs, targets


PAIR = {" ": ["kitten", "puppy"], "": ["电脑", "计算机"]}


def _letters_vocab(n: int) -> list[str]:
    rng = random.Random(1)
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if w not in out and w not in STOPWORDS:
            out.append(w)
    return out


def _zh_vocab(n: int) -> list[str]:
    words = sorted(set(load_synonym_table(tables_dir() / "zh_synonyms.txt")) - STOPWORDS - set(PAIR[""]))
    return random.Random(2).sample([w for w in words if len(w) == 2], n)


@pytest.mark.parametrize("sep", [" ", ""], ids=["en", "zh"])
def test_mining_recovers_a_planted_pair_and_nothing_unrelated(sep):
    vocab = _letters_vocab(210) if sep == " " else _zh_vocab(210)
    # Chinese words are kept apart by spaces so that rjieba cannot merge neighbours into other words
    docs, targets = planted_corpus(vocab)
    if sep == "":
        docs = [d.replace("kitten", "电脑").replace("puppy", "计算机").replace(".", "。") for d in docs]
    a, b = PAIR[sep]
    mined = mine_synonyms(docs)
    assert mined[a][0] == b and mined[b][0] == a
    for t in targets[1:]:
        assert not set(mined.get(t, [])) & {*targets, a, b}, (t, mined.get(t))
    assert set(mined[a]) <= {b}  # the words around it are collocates, not substitutes


def test_sources_are_consulted_most_trusted_first(tmp_path):
    docs, _ = planted_corpus(_letters_vocab(210))
    user = tmp_path / "user.txt"
    user.write_text("kitten kitty\nhappy jolly\n", encoding="utf-8")
    a = Augmenter(AugmentConfig(synonym_table=str(user), wordnet="off"), corpus=docs)
    assert a.synonyms("Kitten") == ["kitty"]  # the user's table wins over the mined pair
    assert a.synonyms("happy") == ["jolly"]  # ... and over the bundled table
    assert a.synonyms("puppy") == ["kitten"]  # mined, used because no table knows the word
    assert "happy" in a.synonyms("glad")  # bundled
    assert a.sources["user_table"]["words"] == 4 and a.sources["mined"]["words"] >= 2
    no_corpus = Augmenter(AugmentConfig(wordnet="off"))
    assert no_corpus.sources["mined"] == "no corpus given" and no_corpus.synonyms("puppy") == []


def test_mining_ignores_rare_words_stopwords_and_digits():
    docs = ["the cat sat on the mat 42 times."] * 50 + ["a dog sat on a rug 7 times."] * 50
    mined = mine_synonyms(docs)
    assert not set(mined) & (STOPWORDS | {"42", "7"})
    assert mine_synonyms(["only once here."]) == {}
    assert mine_synonyms([]) == {}


def test_mining_a_megabyte_is_fast():
    en = "".join(p.read_text("utf-8") for p in sorted((sample_data_dir() / "en").glob("*.txt")))
    texts = en[:1_000_000].split("\n\n")
    t0 = time.perf_counter()
    mined = mine_synonyms(texts)
    seconds = time.perf_counter() - t0
    assert seconds < 10, seconds
    assert len(mined) > 100 and mined == mine_synonyms(texts)  # something found, deterministically
    assert all(w not in STOPWORDS and all(v not in STOPWORDS for v in vs) for w, vs in mined.items())


# ---------------------------------------------------------------------------------------------------------- wordnet


def test_wordnet_absent_is_reported_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk -> ImportError, whether or not it is installed
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    assert not wordnet_available() and wordnet_synonyms("quick") == []
    a = Augmenter(AugmentConfig(mine_synonyms=False))
    assert a.sources["wordnet"].startswith("unavailable")
    assert Augmenter(AugmentConfig(mine_synonyms=False, wordnet="off")).sources["wordnet"] == "off"


def _fake_nltk(monkeypatch, lemmas: dict[str, list[str]]) -> None:
    class Synset:
        def __init__(self, names):
            self.names = names

        def lemma_names(self):
            return self.names

    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = types.SimpleNamespace(synsets=lambda w: [Synset(n) for n in lemmas.get(w, [])])
    nltk = types.ModuleType("nltk")
    nltk.corpus = corpus
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)


def test_wordnet_is_used_when_installed(monkeypatch):
    _fake_nltk(monkeypatch, {"good": [["good"]], "zebra": [["zebra", "plains_zebra"], ["zebra2", "equid"]]})
    assert wordnet_available() and wordnet_synonyms("zebra") == ["plains zebra", "equid"]
    a = Augmenter(AugmentConfig(mine_synonyms=False, builtin_tables=False))
    assert a.sources["wordnet"] == "available"
    new = run_op(a, "A zebra ran.", "synonym", 0)
    assert new in ("A plains zebra ran.", "A equid ran.")
    off = Augmenter(AugmentConfig(mine_synonyms=False, builtin_tables=False, wordnet="off"))
    assert run_op(off, "A zebra ran.", "synonym", 0) == "A zebra ran."
