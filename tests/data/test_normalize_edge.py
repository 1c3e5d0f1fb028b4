"""Regression tests for normalization and filter edge cases found in review (issue 3)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge.data.filters import FilterConfig, Filters, _unit_count, detect_language
from gptforge.data.normalize import PII_ORDER, NormalizeConfig, Normalizer, fold_width, html_to_text, mask_pii
from gptforge.data.text import units


@pytest.fixture(scope="module")
def norm() -> Normalizer:
    return Normalizer(NormalizeConfig())


def test_cjk_punctuation_kept_and_full_width_ascii_folded():
    assert fold_width("你好，世界。“引”、：；！？（）《》「」…") == "你好，世界。“引”、：；！？（）《》「」…"
    assert fold_width("ＡＢＣ１２３　ａｂｃ") == "ABC123 abc"


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("<p>Write &amp;lt; to get &lt; in HTML.</p>", "Write &lt; to get < in HTML."),
        ("<p>A &amp;copy; B</p>", "A &copy; B"),
        ("<p>Tom &amp;amp; Jerry</p>", "Tom &amp; Jerry"),
    ],
)
def test_entities_are_unescaped_once_after_html_extraction(norm, page, expected):
    # html_to_text shows the visible text; the ftfy step used to unescape it a second time ("&lt;" -> "<")
    assert norm(page, "html")[0] == expected


def test_plain_text_entities_still_unescaped(norm):
    assert norm("Tom &amp; Jerry &egrave;", "txt")[0] == "Tom & Jerry è"


@pytest.mark.parametrize(
    "page",
    [
        "<html><head><title>T</title>\n<p>Body paragraph without a body tag.</p>",
        "<html><head><meta charset=utf-8><div>Body paragraph without a body tag.</div></html>",
        "<head><title>T</title></title>Body paragraph without a body tag.",
    ],
)
def test_unclosed_head_ends_at_body_content(page):
    assert "Body paragraph without a body tag." in html_to_text(page)


def test_head_content_still_dropped():
    page = "<html><head><title>Title</title><style>p{}</style><script>x()</script><meta a=b><p>Body</p>"
    assert html_to_text(page) == "Body"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(+86) 138 0013 8000", "<PHONE>"),
        ("(0086)13800138000", "<PHONE>"),
        ("+86 138 0013 8000", "<PHONE>"),
        ("138-0013-8000", "<PHONE>"),
        ("call 1-800-555-0199 now", "call <PHONE> now"),
        ("邮箱:zhang.san+news@mail.pku.edu.cn。", "邮箱:<EMAIL>。"),
        ("身份证号：11010519491231002X，", "身份证号：<ID>，"),
        ("2024-01-15 价格 1,299.00 元 1999年 v3.10.12", "2024-01-15 价格 1,299.00 元 1999年 v3.10.12"),
        ("订单号 2023011512345678", "订单号 2023011512345678"),
    ],
)
def test_pii(text, expected):
    assert mask_pii(text, PII_ORDER) == expected


_ALPHABET = st.sampled_from(list("aZ9_ \n-.İıẞßﬁΣσςǅ²ⅷ٠K\u0301\u0307\u0345中文，。あカ한\U00020000\U0001f600"))


@settings(max_examples=300, deadline=None)
@given(st.text(_ALPHABET, max_size=30))
def test_unit_count_matches_units(text):
    assert _unit_count(text) == len(units(text))


def test_unit_count_dotted_capital_i():
    # "İ".lower() is "i" + U+0307, and the combining dot separates words in `units`
    assert _unit_count("İx") == len(units("İx")) == 2


@pytest.mark.parametrize(
    "text",
    [
        "LAUNCELOT.\nDo I look like a cudgel or a hovel-post, a staff or a prop? Do\nyou know me, father?",
        "JESSICA.\nIn such a night\nMedea gather'd the enchanted herbs\nThat did renew old AEson.",
        "PORTIA.\nYes, yes, it was Bassanio; as I think, so was he called.",
    ],
)
def test_short_english_is_english(text):
    assert detect_language(text) == "en"


@pytest.mark.parametrize(
    "text",
    [
        "Le petit prince est un livre écrit par Antoine de Saint-Exupéry. Il raconte l'histoire d'un enfant.",
        "Der kleine Prinz ist ein Buch von Antoine de Saint-Exupéry. Es erzählt die Geschichte eines Kindes.",
        "El principito es un libro escrito por Antoine de Saint-Exupéry. Cuenta la historia de un niño.",
        "Il piccolo principe è un libro scritto da Antoine de Saint-Exupéry. Racconta la storia di un bambino.",
        "De kleine prins is een boek geschreven door Antoine de Saint-Exupéry. Het vertelt het verhaal van een kind.",
    ],
)
def test_other_latin_is_not_english(text):
    assert detect_language(text) == "latin"


def test_filters_keep_normal_text():
    f = Filters(FilterConfig())
    poem = "《春晓》\n作者：孟浩然\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"
    prose = (
        "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith slipped quickly "
        "through the glass doors of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust."
    )
    assert f.check(poem) is None
    assert f.check(prose) is None
    assert f.check("") == "too_short"
