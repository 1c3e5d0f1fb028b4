"""Byte-level BPE on top of Hugging Face `tokenizers`, saved as a standard `tokenizer.json`.

Byte-level means every string round-trips exactly (no unknown token, no normalizer touching the text). The GPT-2
split regex treats a run of Han characters as one "word", so merges can learn multi-character Chinese tokens; that is
what makes a corpus-trained vocabulary far more efficient on Chinese than GPT-2's English-trained one.

Special tokens are reserved ids that plain text can never produce: `tokenizers` would otherwise match the literal
string "<|eos|>" inside user text and emit the special id, which lets a user forge control tokens (nanochat's
tokenizer test). `Tokenizer.encode` breaks every such literal into two ordinary pieces before encoding. The guard
covers every *special* added token of the tokenizer, not only gptforge's: a Hugging Face tokenizer wrapped with
`Tokenizer.with_specials` also has GPT-2's "<|endoftext|>" or Qwen's "<|im_start|>" guarded. Trade-off: a piece
boundary inside a literal can change how the text around it is tokenized (and a tokenizer whose normalizer prepends
a space to each input, like Llama-2's, then adds one there); ordinary text is tokenized exactly as `tokenizers` does.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_TOKENS]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train on an iterator of strings. Special tokens take the first ids, then the 256 byte symbols."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class Tokenizer:
    """Thin wrapper: safe encode, exact decode, special-token ids, and a content hash for checkpoints."""

    def __init__(self, hf: HFTokenizer, path: Path | None = None) -> None:
        self.hf = hf
        self.path = path
        vocab = hf.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the reserved special tokens {missing}; train it with gptforge")
        self.special_ids = {t: vocab[t] for t in SPECIAL_TOKENS}
        # Every special added token is a control token user text must not produce: gptforge's, and the tokenizer's
        # own when it comes from elsewhere (GPT-2's <|endoftext|>, Qwen's <|im_start|>, Llama-3's reserved ones).
        added = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special and t.content}
        # Longest first, so where two literals start at one place the longer is the one broken.
        literals = sorted(set(added) | set(SPECIAL_TOKENS), key=lambda t: (-len(t), t))
        short = [t for t in literals if len(t) < 2]
        if short:
            raise ValueError(f"special tokens {short} are one character long: text could not be kept from forming them")
        self.control_ids = frozenset(added.values()) | frozenset(self.special_ids.values())
        self._special_re = re.compile("|".join(re.escape(t) for t in literals))

    @classmethod
    def with_specials(cls, hf: HFTokenizer, path: Path | None = None) -> Tokenizer:
        """Wrap any `tokenizers` tokenizer (e.g. a Hugging Face model's tokenizer.json), appending gptforge's
        reserved special tokens it lacks as special tokens with new ids after the existing ones. Ordinary text keeps
        its ids, so a pretrained model still understands it. `hf` itself is not modified; `path` is kept only when
        nothing was added (otherwise the result is no longer that file, and `sha256` tells the two apart)."""
        vocab = hf.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            hf = HFTokenizer.from_str(hf.to_str())
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            path = None
        return cls(hf, path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer not found: {p} (run `gptforge tokenizer` first)")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"cannot read tokenizer {p}: {e}") from None
        return cls(hf, p)

    def save(self, path: str | Path) -> None:
        from gptforge.artifacts import atomic_write_text

        atomic_write_text(path, self.hf.to_str(pretty=True))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    def sha256(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    def _safe_pieces(self, text: str) -> list[str]:
        """Split text so no piece contains a special-token literal: '<|eos|>' becomes '<' + '|eos|>'."""
        if not self._special_re.search(text):
            return [text]
        pieces, last = [], 0
        for m in self._special_re.finditer(text):
            pieces += [text[last : m.start() + 1], text[m.start() + 1 : m.end()]]
            last = m.end()
        pieces.append(text[last:])
        # Only the tail of a match can still hold a literal (one overlapping it, e.g. '<|a|>' and '|a|>'); every
        # piece is shorter than text, so the recursion ends.
        return [q for p in pieces if p for q in (self._safe_pieces(p) if self._special_re.search(p) else [p])]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Never yields a special-token id (`control_ids`), whatever the text contains."""
        pieces = self._safe_pieces(text)
        if len(pieces) == 1:
            return self.hf.encode(pieces[0], add_special_tokens=False).ids
        return [i for enc in self.hf.encode_batch(pieces, add_special_tokens=False) for i in enc.ids]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Parallel (Rust threads) encode of many texts; same result as calling `encode` on each."""
        if not any(self._special_re.search(t) for t in texts):
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)


# --- statistics -----------------------------------------------------------------------------------------------


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2EBEF
        or 0xF900 <= cp <= 0xFAFF
        or 0x3000 <= cp <= 0x303F  # CJK punctuation
        or 0xFF00 <= cp <= 0xFFEF  # full-width forms
    )


def script_of(line: str) -> str | None:
    """'zh' when most letters are CJK, 'en' when most are Latin, None for lines with neither (other scripts,
    digits, punctuation only)."""
    cjk = latin = 0
    for ch in line:
        if is_cjk(ch):
            cjk += 1
        elif ch.isascii() and ch.isalpha():
            latin += 1
    if cjk == 0 and latin == 0:
        return None
    return "zh" if cjk >= latin else "en"


@dataclass
class ScriptStats:
    chars: int = 0
    bytes: int = 0
    tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "chars": self.chars,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "chars_per_token": round(self.chars / self.tokens, 3) if self.tokens else None,
            "bytes_per_token": round(self.bytes / self.tokens, 3) if self.tokens else None,
        }


def tokenizer_stats(tok: Tokenizer, texts: Iterator[str], max_lines: int = 200_000) -> dict:
    """Characters and bytes per token, separately for Chinese and English lines."""
    stats = {"zh": ScriptStats(), "en": ScriptStats()}
    lines: dict[str, list[str]] = {"zh": [], "en": []}
    n = 0
    for text in texts:
        for line in text.splitlines():
            s = script_of(line)
            if s is None:
                continue
            lines[s].append(line)
            n += 1
            if n >= max_lines:
                break
        if n >= max_lines:
            break
    for s, ls in lines.items():
        for line, ids in zip(ls, tok.encode_batch(ls)):
            stats[s].chars += len(line)
            stats[s].bytes += len(line.encode("utf-8"))
            stats[s].tokens += len(ids)
    return {
        "vocab_size": tok.vocab_size,
        "lines": {k: len(v) for k, v in lines.items()},
        **{k: v.as_dict() for k, v in stats.items()},
    }
