"""Classification metrics against scikit-learn (the oracle, test-only), the table, the JSON and the PNG."""

import json
import logging
import struct
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from gptforge.eval.classification import (
    FLAT_KEYS,
    classification_metrics,
    display_labels,
    find_font_for,
    flat_metrics,
    metrics_table,
    plot_confusion_matrix,
    write_confusion_json,
)

ZH = ["体育", "财经", "科技", "娱乐", "教育"]


def _random_cases():
    """(y_true, y_pred, k) for many seeds, class counts 2..7 and sizes from 1 up; small n leaves classes absent."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        for k in range(2, 8):
            for n in (1, 3, k, 5 * k):
                t = rng.integers(0, k, n)
                p = np.where(rng.random(n) < 0.5, t, rng.integers(0, k, n))
                yield t, p, k
            # A class never predicted and a class never true, on purpose.
            t = rng.integers(0, k - 1, 20)
            p = rng.integers(1, k, 20)
            yield t, p, k


def _ref(t, p, k, average):
    return precision_recall_fscore_support(t, p, labels=list(range(k)), average=average, zero_division=0)


def test_matches_sklearn_on_random_predictions():
    cases = list(_random_cases())
    assert len(cases) > 300
    absent_seen = 0
    for t, p, k in cases:
        labels = [f"c{i}" for i in range(k)]
        m = classification_metrics(t.tolist(), p, labels)
        absent_seen += len(set(range(k)) - set(t.tolist())) > 0
        assert m["n"] == len(t)
        assert m["accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
        for avg in ("macro", "micro", "weighted"):
            pr, rc, f1, _ = _ref(t, p, k, avg)
            got = (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"])
            assert got == pytest.approx((pr, rc, f1), abs=1e-12), (avg, t, p, k)
        pr, rc, f1, sup = _ref(t, p, k, None)
        for i, lab in enumerate(labels):
            c = m["per_class"][lab]
            assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((pr[i], rc[i], f1[i]), abs=1e-12)
            assert c["support"] == sup[i]
        assert m["confusion_matrix"] == confusion_matrix(t, p, labels=list(range(k))).tolist()
        assert m["labels"] == labels
    assert absent_seen > 50


def test_micro_equals_accuracy_and_flat_keys():
    m = classification_metrics([0, 1, 2, 2, 1], [0, 2, 2, 1, 1], ["a", "b", "c"])
    flat = flat_metrics(m)
    assert tuple(flat) == FLAT_KEYS and len(flat) == 10
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["precision_micro"] == flat["recall_micro"] == flat["f1_micro"] == flat["accuracy"] == 0.6
    json.dumps(m)  # plain Python types only


def test_zero_division_is_zero():
    # Class 2 is neither true nor predicted; class 1 is true but never predicted.
    m = classification_metrics([0, 1, 0], [0, 0, 0], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["b"]["precision"] == 0.0
    assert m["precision_macro"] == pytest.approx((2 / 3) / 3)


@pytest.mark.parametrize(
    "t, p, labels, match",
    [
        ([0, 1], [0], ["a", "b"], "y_true has 2 items but y_pred has 1"),
        ([], [], ["a", "b"], "empty"),
        ([0, 3], [0, 1], ["a", "b"], r"y_true\[1\] = 3 is out of range"),
        ([0, 1], [0, -1], ["a", "b"], r"y_pred\[1\] = -1 is out of range"),
        ([0, 1.5], [0, 1], ["a", "b"], r"y_true\[1\] = 1.5 is not a class index"),
        ([0, "b"], [0, 1], ["a", "b"], r"y_true\[1\] = 'b'"),
        ([0], [0], [], "labels is empty"),
        ([0], [0], ["a", "a"], "duplicates"),
    ],
)
def test_validation(t, p, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(t, p, labels)


def test_float_indices_that_are_integers_are_accepted():
    a = classification_metrics(np.array([0.0, 1.0, 1.0]), [0, 1, 0], ["a", "b"])
    b = classification_metrics([0, 1, 1], [0, 1, 0], ["a", "b"])
    assert a == b


def test_metrics_table():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 0, 2], ["pos", "neg|x", "体育"])
    table = metrics_table(m)
    lines = table.strip().splitlines()
    assert lines[0] == "| class | precision | recall | f1 | support |"
    assert len(lines) == 2 + 3 + 4
    assert lines[2] == "| pos | 0.500 | 1.000 | 0.667 | 1 |"
    assert "neg\\|x" in lines[3] and "体育" in lines[4]
    assert "micro avg (= accuracy" in table and lines[-1] == "| **accuracy** |  |  | 0.750 | 4 |"
    assert f"| {m['f1_macro']:.3f} | 4 |" in lines[5]


def test_write_confusion_json(tmp_path):
    m = classification_metrics([0, 1, 1], [0, 1, 0], ZH[:2])
    path = tmp_path / "sub" / "cm.json"
    write_confusion_json(m["confusion_matrix"], m["labels"], path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["labels"] == ZH[:2] and data["matrix"] == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(3, 3\)"):
        write_confusion_json(m["confusion_matrix"], ZH[:3], path)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _plot_quietly(recwarn, caplog, *args, **kwargs):
    with caplog.at_level(logging.WARNING):
        out = plot_confusion_matrix(*args, **kwargs)
    assert not [str(w.message) for w in recwarn], "matplotlib warned"
    assert not [r.getMessage() for r in caplog.records if "glyph" in r.getMessage().lower()]
    return out


@pytest.mark.parametrize(
    "labels, title",
    [(["positive", "negative"], "sentiment $5"), (ZH, "新闻分类"), (ZH + ["other", "$x$"], "mixed 混合")],
)
def test_plot_png_without_warnings(tmp_path, recwarn, caplog, labels, title):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, (len(labels), len(labels)))
    cm[0] = 0  # an all-zero row must not divide by zero
    path = _plot_quietly(recwarn, caplog, cm, labels, tmp_path / "cm.png", title=title)
    assert path == tmp_path / "cm.png"
    w, h = _png_size(path)
    assert w > 200 and h > 200
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temp file left behind


def test_plot_scales_to_50_classes(tmp_path, recwarn, caplog):
    small = _plot_quietly(recwarn, caplog, np.eye(2, dtype=int), ["a", "b"], tmp_path / "2.png")
    labels = [f"class_{i}" for i in range(50)]
    cm = np.random.default_rng(1).integers(0, 5, (50, 50))
    big = _plot_quietly(recwarn, caplog, cm, labels, tmp_path / "50.png")
    assert _png_size(big)[0] > 3 * _png_size(small)[0]


def test_rendering_chinese_directly_would_warn(tmp_path):
    """The control for the tests above: without the fallback, matplotlib does warn on this machine."""
    if find_font_for("".join(ZH)) is not None:
        pytest.skip("a CJK font is installed here; the fallback is not used")
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().set_title(ZH[0])
    with pytest.warns(UserWarning, match="Glyph"):
        fig.savefig(tmp_path / "x.png")


def test_display_labels_fallback_and_font_path():
    ticks, font, caption = display_labels(ZH[:3], font_for=lambda text: None)
    assert ticks == ["0", "1", "2"] and font is None
    assert caption.isascii() and "0: '\\u4f53\\u80b2'" in caption and "2: " in caption
    ticks, font, caption = display_labels(["a", "b"], font_for=lambda text: "/some/font.ttf")
    assert ticks == ["a", "b"] and font == "/some/font.ttf" and caption == ""


def test_find_font_for():
    from matplotlib.ft2font import FT2Font

    latin = find_font_for("positive negative")
    assert latin is not None and "lastresort" not in latin.lower()
    zh = find_font_for("".join(ZH))
    if zh is not None:  # only where a CJK font is installed: it must really cover the glyphs
        cmap = FT2Font(zh).get_charmap()
        assert all(ord(ch) in cmap for ch in "".join(ZH))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_font_for("体育")
