import json

import numpy as np
import pytest

from gptforge.data.readers import DataError, Document, read_documents, split_pieces
from gptforge.data.sampler import WindowSampler
from gptforge.data.shards import TokenWindows, build_token_shards, split_of, token_dtype
from gptforge.tokenizer.bpe import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_run) -> Tokenizer:
    return Tokenizer.load(tokenizer_run / "tokenizer")


def test_reader_handles_txt_md_jsonl_and_bom(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffhello 世界".encode())
    (tmp_path / "b.md").write_text("# title\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")  # other extensions are not read
    docs = list(read_documents(tmp_path))
    assert [d.text for d in docs] == ["hello 世界", "# title\n", "one", "two"]
    assert docs[2].source == "c.jsonl:1" and docs[3].source == "c.jsonl:3"


@pytest.mark.parametrize(
    "content,match",
    [
        (b"\x00\x01\x02binary", "binary"),
        ("caf\u00e9".encode("latin-1"), "encoding_unknown: UTF-8 fails"),
    ],
)
def test_bad_files_are_named(tmp_path, content, match):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(DataError, match=f"bad.txt.*{match}"):
        list(read_documents(tmp_path))


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid_json"):
        list(read_documents(tmp_path))
    (tmp_path / "d.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: missing_text_field"):
        list(read_documents(tmp_path))


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no readable text files"):
        list(read_documents(tmp_path))


def test_split_pieces_keeps_all_text():
    doc = Document("f.txt", "".join(f"line {i}\n" for i in range(1000)))
    pieces = split_pieces(doc, 500)
    assert "".join(p.text for p in pieces) == doc.text
    assert len({p.source for p in pieces}) == len(pieces) > 10


def test_split_is_deterministic_and_disjoint(corpus, tok, tmp_path):
    a = build_token_shards(corpus, tok, tmp_path / "a", val_fraction=0.1, piece_chars=1000)
    b = build_token_shards(corpus, tok, tmp_path / "b", val_fraction=0.1, piece_chars=1000)
    for split in ("train", "val"):
        for fa, fb in zip(a[f"{split}_files"], b[f"{split}_files"]):
            assert (tmp_path / "a" / fa).read_bytes() == (tmp_path / "b" / fb).read_bytes()
    assert a["val_pieces"] > 0 and a["train_pieces"] > 5 * a["val_pieces"]
    sources = [f"x{i}" for i in range(2000)]
    share = sum(split_of(s, 1, 0.1) == "val" for s in sources) / 2000
    assert 0.07 < share < 0.13


def test_shards_hold_every_token(corpus, tok, tmp_path):
    meta = build_token_shards(corpus, tok, tmp_path / "t", val_fraction=0.1, piece_chars=1000, shard_tokens=5000)
    assert len(meta["train_files"]) > 1  # several shards
    total = sum(np.fromfile(tmp_path / "t" / f, dtype=np.uint16).size for f in meta["train_files"] + meta["val_files"])
    assert total == meta["train_tokens"] + meta["val_tokens"]
    pieces = [p for d in read_documents(corpus) for p in split_pieces(d, 1000)]
    assert total == sum(len(tok.encode(p.text)) + 2 for p in pieces)  # + BOS and EOS per piece


def test_shards_are_reused_and_rebuilt_on_change(corpus, tok, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    build_token_shards(src, tok, tmp_path / "t")
    stamp = (tmp_path / "t" / "meta.json").stat().st_mtime_ns
    build_token_shards(src, tok, tmp_path / "t")
    assert (tmp_path / "t" / "meta.json").stat().st_mtime_ns == stamp
    (src / "new.txt").write_text("new text " * 100)
    meta = build_token_shards(src, tok, tmp_path / "t")
    assert meta["documents"] == 1 + 96 + 1


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_sampler_resume_gives_the_same_batches(corpus, tok, tmp_path):
    build_token_shards(corpus, tok, tmp_path / "t", piece_chars=1000)
    windows = TokenWindows(tmp_path / "t", "train", 32)
    ref = WindowSampler(windows, 8, seed=3)
    seen = [ref.next_batch()[0] for _ in range(len(windows) // 8 + 5)]  # crosses an epoch boundary
    s = WindowSampler(windows, 8, seed=3)
    for _ in range(7):
        s.next_batch()
    state = s.state_dict()
    resumed = WindowSampler(windows, 8, seed=3)
    resumed.load_state_dict(state)
    for i in range(7, len(seen)):
        assert np.array_equal(resumed.next_batch()[0], seen[i])


def test_ranks_split_the_global_batch(corpus, tok, tmp_path):
    build_token_shards(corpus, tok, tmp_path / "t", piece_chars=1000)
    windows = TokenWindows(tmp_path / "t", "train", 32)
    one = WindowSampler(windows, 8, seed=3)
    ranks = [WindowSampler(windows, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert np.array_equal(x, np.concatenate([p[0] for p in parts]))
        assert np.array_equal(x[:, 1:], y[:, :-1])


def test_too_little_data_is_named(corpus, tok, tmp_path):
    build_token_shards(corpus, tok, tmp_path / "t", piece_chars=1000)
    with pytest.raises(DataError, match="validation|window"):
        TokenWindows(tmp_path / "t", "val", 100_000)
    (tmp_path / "one.txt").write_text("tiny")
    with pytest.raises(DataError, match="validation split is empty"):
        build_token_shards(tmp_path / "one.txt", tok, tmp_path / "u")


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path):
    text = "第一行\u2028第二行\u2029第三\u0085段\x1c完"
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [d.text for d in read_documents(tmp_path)] == [text]


def test_unpaired_surrogate_is_named(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud83d"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: .*surrogate"):
        list(read_documents(tmp_path))


def test_text_field_change_rebuilds(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    rows = [{"text": f"long body text number {i} " * 30, "title": f"t{i}"} for i in range(60)]
    (src / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = build_token_shards(src, tok, tmp_path / "t", val_fraction=0.2)
    b = build_token_shards(src, tok, tmp_path / "t", val_fraction=0.2, text_field="title")
    assert b["train_tokens"] + b["val_tokens"] < (a["train_tokens"] + a["val_tokens"]) / 10


def test_relative_input_path(tmp_path, monkeypatch):
    """`gptforge pretrain --input runs/x/clean/data` from the repository root: a relative path must work."""
    from gptforge.data.shards import input_fingerprint

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert input_fingerprint("data") == input_fingerprint(tmp_path / "data")
    assert [d.source for d in read_documents("data")] == ["a.jsonl:1"]


def test_a_step_reads_the_same_windows_whatever_the_world_size(corpus, tok, tmp_path):
    """2 ranks x 4 per micro-batch, 2 x 2 with accumulation 2, and 1 x 4 with accumulation 4: every optimizer step
    reads the same 16 windows, across epoch ends too; a state saved at one split resumes at another."""
    build_token_shards(corpus, tok, tmp_path / "t", piece_chars=1000)
    windows = TokenWindows(tmp_path / "t", "train", 32)
    assert len(windows) % 16, "the epoch tail must be uneven for the test to mean something"

    def steps(micro, world, accum, n_steps, state=None):
        ranks = [WindowSampler(windows, micro, 3, r, world, accum) for r in range(world)]
        if state:
            for s in ranks:
                s.load_state_dict(state)
        out = []
        for _ in range(n_steps):
            out.append(sorted(x.tolist() for _ in range(accum) for s in ranks for x in s.next_batch()[0]))
        return out, ranks[0].state_dict()

    n = 2 * len(windows) // 16 + 3  # more than two epochs
    ref, _ = steps(4, 2, 2, n)
    assert steps(8, 2, 1, n)[0] == ref and steps(4, 1, 4, n)[0] == ref
    half, state = steps(8, 2, 1, n // 2)
    assert half + steps(4, 1, 4, n - n // 2, state)[0] == ref
    with pytest.raises(ValueError, match="checkpoint has step_batch=16, this run has step_batch=8"):
        WindowSampler(windows, 4, 3, accum=2).load_state_dict(state)
