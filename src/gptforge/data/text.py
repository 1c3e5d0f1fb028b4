"""Text units shared by the filters, near-duplicate detection and decontamination.

Chinese has no spaces, so word n-grams do not exist for it; English words are too coarse to cut into characters.
A *unit* is therefore one CJK character (ideograph, kana or Hangul syllable) or one run of other letters and digits
(a word). n-grams of units are character n-grams on Chinese text and word n-grams on English text, and work on a
mix of both without a language switch. Everything is lower-cased; punctuation and whitespace only separate units.
"""

from __future__ import annotations

import re

# CJK Unified Ideographs (+ extension A, compatibility, extensions B-H in the supplementary planes), kana, Hangul.
CJK_CHARS = (
    "\u3041-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff"  # kana (not U+30FB '・', common punctuation in Chinese)
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # ext A, unified, compatibility ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\U00020000-\U0003134f"  # ideograph extensions B-H
)
UNIT_RE = re.compile(rf"[{CJK_CHARS}]|[^\W_{CJK_CHARS}]+")
CJK_RE = re.compile(rf"[{CJK_CHARS}]")


def units(text: str) -> list[str]:
    """Lower-cased units of `text`: each CJK character alone, each run of other letters/digits as one word."""
    return UNIT_RE.findall(text.lower())
