"""Documents -> memory-mapped token shards, with a deterministic train/validation split.

Each piece of text is encoded between the BOS and EOS ids (generation prompts start with BOS too), then appended
to the current shard of its split. Shards are flat arrays (uint16 when the vocabulary fits, else uint32) written to a
temporary folder and renamed into place with a `meta.json` carrying counts, the tokenizer hash and a fingerprint of
the input, so a later run with the same input and tokenizer reuses them and a changed input rebuilds them.

The split is by piece: a piece goes to validation when a hash of (seed, source id) falls under `val_fraction`. It is
independent of file order, worker count and machine, and no text is in both splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.artifacts import fsync_dir, sha256_file, write_json
from gptforge.data.readers import DataError, Document, list_files, read_documents, split_pieces
from gptforge.tokenizer.bpe import Tokenizer

META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_of(source: str, seed: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"{seed}:{source}".encode()).digest()
    u = int.from_bytes(h[:8], "little") / 2**64
    return "val" if u < val_fraction else "train"


def input_fingerprint(path: str | Path) -> str:
    """Hash of every input file's relative name and content: the cache key of the shards."""
    root = Path(path).absolute()  # list_files gives absolute paths, whatever the working directory
    h = hashlib.sha256()
    for f in list_files(root):
        h.update(str(f.relative_to(root if root.is_dir() else root.parent)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


@dataclass
class ShardWriter:
    folder: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    buf: list[np.ndarray] | None = None
    n_buf: int = 0
    files: list[str] | None = None
    tokens: int = 0
    bytes: int = 0
    pieces: int = 0

    def __post_init__(self) -> None:
        self.buf, self.files = [], []

    def add(self, ids: list[int], n_bytes: int) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.buf.append(arr)
        self.n_buf += arr.size
        self.tokens += arr.size
        self.bytes += n_bytes
        self.pieces += 1
        if self.n_buf >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.n_buf:
            return
        name = f"{self.split}_{len(self.files):05d}.bin"
        with open(self.folder / name, "wb") as f:
            np.concatenate(self.buf).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        self.files.append(name)
        self.buf, self.n_buf = [], 0


def build_token_shards(
    input_path: str | Path,
    tok: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 1337,
    piece_chars: int = 4000,
    shard_tokens: int = 50_000_000,
    batch_pieces: int = 512,
    text_field: str = "text",
    fingerprint: str | None = None,
) -> dict:
    """Encode the input into `out_dir/{train,val}_NNNNN.bin` and return the meta dict. Reuses existing shards
    when everything that decides their content (input, tokenizer, split settings, text field) is unchanged."""
    out = Path(out_dir)
    key = {
        "input_fingerprint": fingerprint or input_fingerprint(input_path),
        "tokenizer_sha256": tok.sha256(),
        "val_fraction": val_fraction,
        "seed": seed,
        "piece_chars": piece_chars,
        "text_field": text_field,
    }
    if (out / META).is_file():
        meta = json.loads((out / META).read_text())
        if all(meta.get(k) == v for k, v in key.items()):
            return meta
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dtype = token_dtype(tok.vocab_size)
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}

        pieces: list[Document] = []

        def drain() -> None:
            # encode_batch runs on all cores in Rust: this is the parallel part of tokenization.
            for piece, ids in zip(pieces, tok.encode_batch([p.text for p in pieces])):
                ids = [tok.bos_id, *ids, tok.eos_id]
                writers[split_of(piece.source, seed, val_fraction)].add(ids, len(piece.text.encode("utf-8")))
            pieces.clear()

        n_docs = 0
        for doc in read_documents(input_path, text_field=text_field):
            n_docs += 1
            pieces.extend(split_pieces(doc, piece_chars))
            if len(pieces) >= batch_pieces:
                drain()
        drain()
        if n_docs == 0:
            raise DataError(f"no text found in {input_path} (all files are empty)")
        for w in writers.values():
            w.flush()
        if writers["val"].tokens == 0 and val_fraction > 0:
            raise DataError(
                f"validation split is empty: {writers['train'].pieces} piece(s) of text, val_fraction={val_fraction}; "
                "add more text or raise data.val_fraction"
            )
        meta = {
            **key,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "documents": n_docs,
            **{f"{s}_{k}": getattr(w, k) for s, w in writers.items() for k in ("tokens", "bytes", "pieces", "files")},
        }
        write_json(tmp / META, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing half-written behind
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return meta


class TokenWindows:
    """Fixed-length windows of T+1 tokens over memory-mapped shards of one split. Window i starts at a multiple of
    T inside one shard; windows never straddle shards, so any window is a contiguous read."""

    def __init__(self, folder: str | Path, split: str, seq_len: int) -> None:
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        dtype = np.dtype(meta["dtype"])
        self.seq_len = seq_len
        self.tokens = meta[f"{split}_tokens"]
        self.bytes = meta[f"{split}_bytes"]
        self.arrays = [np.memmap(folder / f, dtype=dtype, mode="r") for f in meta[f"{split}_files"]]
        counts = [max(0, (a.size - 1) // seq_len) for a in self.arrays]
        self.offsets = np.cumsum([0] + counts)
        if self.offsets[-1] == 0:
            raise DataError(
                f"the {split} split has {self.tokens} tokens, fewer than one window of {seq_len + 1}; "
                "lower the context length or add text"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = (i - int(self.offsets[s])) * self.seq_len
        return np.asarray(self.arrays[s][start : start + self.seq_len + 1], dtype=np.int64)
