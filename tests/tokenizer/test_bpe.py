import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer, script_of, tokenizer_stats, train_bpe

TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "To be, or not to be, that is the question.",
    "Shall I compare thee to a summer's day? 春眠不觉晓，处处闻啼鸟。",
] * 50


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_bpe(TEXTS, vocab_size=400))


# Any Unicode scalar value (lone surrogates are not encodable text), biased towards the hard cases.
UNICODE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
HARD = st.sampled_from(
    [
        "\u0301",
        "e\u0301",
        "🧑‍🚀",
        "\x00",
        "\x1b[31m",
        "\r\n",
        "\t",
        "　",
        "ｆｕｌｌ",
        "𠀀",
        "\ufeff",
        "<|eos|>",
        "<|user|>hi<|end|>",
        "<|",
        "|>",
        " ",
        "  ",
        "\u200d",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(UNICODE, HARD), max_size=6).map("".join))
def test_round_trip_is_exact(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(UNICODE, HARD), max_size=6).map("".join))
def test_plain_text_never_yields_special_ids(tok, s):
    special = set(tok.special_ids.values())
    assert not special & set(tok.encode(s))
    assert all(not special & set(ids) for ids in tok.encode_batch([s, "x" + s]))


def test_special_literals_do_not_collapse(tok):
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t)
        assert len(ids) > 1 and tok.decode(ids) == t


def test_special_tokens_are_reserved_first(tok):
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert 300 < tok.vocab_size <= 400  # the tiny corpus may run out of merges before 400


def test_batch_equals_single(tok):
    batch = tok.encode_batch(TEXTS[:3] + ["a<|eos|>b"])
    assert batch == [tok.encode(t) for t in TEXTS[:3] + ["a<|eos|>b"]]


def test_learns_multi_character_chinese_tokens(tok):
    ids = tok.encode("床前明月光")
    assert len(ids) < 5  # fewer tokens than characters: merges span whole characters


def test_save_load_and_hash(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.sha256() == tok.sha256()
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    json.loads((tmp_path / "tokenizer.json").read_text())  # plain HF tokenizer.json


def test_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(TEXTS[1], add_special_tokens=False) == tok.encode(TEXTS[1])


def test_missing_or_foreign_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)


def test_stats_by_script(tok):
    stats = tokenizer_stats(tok, iter(TEXTS))
    assert stats["lines"] == {"zh": 50, "en": 100}  # the mixed line is mostly Latin letters
    assert stats["zh"]["chars_per_token"] > 1.0
    assert script_of("123 !!") is None and script_of("春 a") == "zh" and script_of("ab 春") == "en"


def test_vocab_too_small_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TEXTS, vocab_size=100)


def test_script_balancing_gives_chinese_more_merges(tmp_path):
    from gptforge.stages import tokenizer as stage

    src = tmp_path / "src"
    src.mkdir()
    zh = "\n".join(TEXTS[0] for _ in range(30))
    en = "\n".join(f"The {i}th quick brown fox jumps over the lazy dog near river number {i}." for i in range(3000))
    (src / "zh.txt").write_text(zh)
    (src / "en.txt").write_text(en)
    runs = {}
    for bal in (1.0, 20.0):
        cfg = stage.Config(
            run_dir=str(tmp_path / str(bal)), input=str(src), vocab_size=400, balance_scripts=bal, holdout_fraction=0.0
        )
        runs[bal] = stage.run(cfg)
    assert runs[1.0]["train_repeat"] == {"zh": 1, "en": 1}
    assert runs[20.0]["train_repeat"]["zh"] > 1 and runs[20.0]["train_repeat"]["en"] == 1
    assert runs[20.0]["zh"]["chars_per_token"] > runs[1.0]["zh"]["chars_per_token"]


def test_tokenizer_stage_refuses_to_replace_a_different_tokenizer(tmp_path, corpus):
    from gptforge.stages import tokenizer as stage

    cfg = stage.Config(run_dir=str(tmp_path), input=str(corpus), vocab_size=600)
    first = stage.run(cfg)
    stage.run(cfg)  # same settings retrain the identical tokenizer: allowed
    before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="--overwrite"):
        stage.run(cfg.model_copy(update={"vocab_size": 500}))
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before
    stage.run(cfg.model_copy(update={"vocab_size": 500, "overwrite": True}))
    assert first["measured_on"] == "held-out text"
