"""Fixtures of the serve tests: the session's trained tokenizer (1024 tokens, zh + en)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok(tokenizer_run):
    from gptforge.tokenizer.bpe import Tokenizer

    return Tokenizer.load(tokenizer_run / "tokenizer")
