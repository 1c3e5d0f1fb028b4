"""`gptforge report`: the run page in Markdown and self-contained HTML, from real stage output and hand-made runs.

Numbers on the page are checked against the JSON they came from (formatted independently here), user text must come
out escaped, and a malformed file must become a warning that names it rather than a crash.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from gptforge.report import build_report
from gptforge.stages import report as report_stage

XSS = "<script>alert('x')</script>"
FAKE_PNG = b"\x89PNG\r\n\x1a\nnot really an image"


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))


def outside_fences(md: str) -> str:
    """The Markdown without its fenced code blocks (their content is shown verbatim, never rendered as HTML)."""
    return re.sub(r"(?ms)^(`{3,})text\n.*?\n\1$", "", md)


def external_refs(page: str) -> list[str]:
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page)
    return [r for r in refs if re.match(r"(?i)(https?:)?//", r)]


COMPRESS = {
    "int8": {
        "task": "lm",
        "before": {"size_bytes": 20197688, "params": 5048576, "ppl": 85.25900707044066, "decode_tok_s": 697.9},
        "after": {"size_bytes": 5132864, "params": 5048576, "ppl": 85.24352776104037, "decode_tok_s": 1170.0},
        "change": {"size_ratio": 0.25413126492497556, "ppl_delta_pct": -0.018155629454495337, "decode_speedup": 1.67},
        "quantization": {"scheme": "int8", "group_size": None},
        "pruning": None,
    },
    "wanda50-int4": {
        "task": "lm",
        "before": {"size_bytes": 20197688, "ppl": 85.259},
        "after": {"size_bytes": 3100000, "ppl": 97.5},
        "change": {"size_ratio": 0.15348, "ppl_delta_pct": 14.3571},
        "quantization": {"scheme": "int4", "group_size": 64},
        "pruning": {"method": "wanda", "sparsity": 0.5},
    },
}
LABELS = ["en", "唐诗", XSS]
CLASSIFY = {
    "task": "classify",
    "checkpoint": "runs/x/finetune/cls/checkpoints/step-00000010",
    "data": f"test-{XSS}.jsonl",
    "metrics": {
        "n": 10,
        "accuracy": 0.7,
        "labels": LABELS,
        "precision_macro": 0.6111111111111112,
        "recall_macro": 0.5833333333333334,
        "f1_macro": 0.5873015873015873,
        "precision_micro": 0.7,
        "recall_micro": 0.7,
        "f1_micro": 0.7,
        "precision_weighted": 0.7,
        "recall_weighted": 0.7,
        "f1_weighted": 0.6952380952380952,
        "per_class": {
            "en": {"precision": 1.0, "recall": 0.75, "f1": 0.8571428571428571, "support": 4},
            "唐诗": {
                "precision": 0.6666666666666666,
                "recall": 0.6666666666666666,
                "f1": 0.6666666666666666,
                "support": 3,
            },
            XSS: {"precision": 0.16666666666666666, "recall": 0.3333333333333333, "f1": 0.2222, "support": 3},
        },
        "confusion_matrix": [[3, 0, 1], [0, 2, 1], [0, 1, 2]],
    },
    "data_report": {"data": {"read": 11, "used": 10, "skipped": {"no_label": 1}}},
}


@pytest.fixture
def handmade(tmp_path) -> Path:
    """A run dir written by hand: every optional stage, user text with markup, and two malformed files."""
    run = tmp_path / "run"
    jsonl(
        run / "ledger.jsonl",
        [
            {"time": "t1", "stage": "clean", "status": "ok", "metrics": {"records": {"in": 12, "kept": 7}}},
            "{this line is not JSON",
            {"time": "t2", "stage": f"evaluate/{XSS}", "status": "ok", "metrics": {"accuracy": 0.7}},
            {"time": "t3", "stage": "compress/int8", "status": "ok", "metrics": COMPRESS["int8"]["change"]},
        ],
    )
    records = {
        "in": 12,
        "kept": 7,
        "dropped": {"too_short": 2},
        "deduplicated": {"exact": 2},
        "quarantined": {"enc": 1},
    }
    write(run / "clean" / "stats.json", {"records": records, "files": {"in": 3, "ok": 3}})
    write(run / "tokenizer" / "stats.json", '{"vocab_size": 1024, "zh": ')  # truncated: malformed
    ft = run / "finetune" / "cls"
    rows = [{"step": 5, "loss": 1.25, "tok_s": 900.0}, "garbage", {"step": 10, "loss": 0.5, "tok_s": 1100.0}]
    jsonl(ft / "metrics.jsonl", rows + [{"step": 10, "val_loss": 0.75, "val_accuracy": 0.625}])
    write(ft / "summary.json", {"steps": 10, "best_step": 10, "monitor": "val_loss", "val": {"val_loss": 0.75}})
    write(run / "evaluate" / "cls" / "metrics.json", CLASSIFY)
    (run / "evaluate" / "cls" / "confusion.png").write_bytes(FAKE_PNG)
    write(run / "evaluate" / "chat" / "metrics.json", {"task": "chat", "metrics": {"loss": 5.4594409, "ppl": 234.966}})
    jsonl(
        run / "evaluate" / "chat" / "samples.jsonl", [{"prompt": "请背诵", "reference": "床前", "reply": XSS + "\n```"}]
    )
    jsonl(run / "generate" / "samples.jsonl", [{"prompt": "《春晓》", "completion": "春眠", "new_tokens": 2}])
    for name, rep in COMPRESS.items():
        write(run / "compress" / name / "report.json", rep)
        write(run / "compress" / name / "report.md", "| x |")
    load = "python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('x')\""
    write(
        run / "export" / "hf.export.json",
        {"format": "hf", "out": "runs/x/export/hf", "num_params": 5048576, "load": load},
    )
    levels = [{"concurrency": 1, "tokens_per_s": 582.9}, {"concurrency": 32, "tokens_per_s": 3143.9}]
    write(run / "serve" / "bench.json", {"benchmark": "serve_load", "levels": levels})
    return run


def test_trained_run_report_traces_numbers_to_sources(trained_run, tmp_path):
    res = build_report(trained_run, tmp_path / "rep")
    assert res["sections"] == ["overview", "tokenizer", "pretraining"] and res["warnings"] == []
    md, page = res["md"].read_text(encoding="utf-8"), res["html"].read_text(encoding="utf-8")
    summary = json.loads((trained_run / "pretrain" / "summary.json").read_text())
    assert f"| final val_loss | {summary['val']['val_loss']:.4f} |" in md
    assert f"| final val_ppl | {summary['val']['val_ppl']:.4f} |" in md
    assert f"| steps | {summary['steps']} |" in md and f"| params | {summary['params']:,} |" in md
    evals = [json.loads(x) for x in (trained_run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert f"| lowest val_loss | {best['step']} | {best['val_loss']:.4f} | {best['val_ppl']:.4f} |" in md
    tok = json.loads((trained_run / "tokenizer" / "stats.json").read_text())
    lang = next(k for k, v in tok.items() if isinstance(v, dict) and "chars_per_token" in v)
    assert f"| {lang} | {tok[lang]['chars']:,} |" in md and f"{tok[lang]['chars_per_token']:.4f}" in md
    ledger = [json.loads(x) for x in (trained_run / "ledger.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in ledger] == ["pretrain"]  # the fixture copied tokenizer/ in, without its ledger line
    assert f"| pretrain | ok | {ledger[0]['time']} | val.val_loss = {summary['val']['val_loss']:.4f}" in md
    for absent in ("## Data", "## Fine-tuning", "## Compression", "## Serving", "## Warnings"):
        assert absent not in md
    # Our own plot, linked relatively from the Markdown and embedded byte for byte in the HTML.
    (png,) = res["plots"]
    assert png.name == "loss_pretrain.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](loss_pretrain.png)" in md and base64.b64encode(png.read_bytes()).decode() in page
    assert external_refs(page) == [] and "<script" not in page and "<link" not in page


def test_handmade_run_sections_escaping_and_warnings(handmade):
    res = build_report(handmade)
    assert res["md"] == handmade / "report" / "report.md"
    expected = ["overview", "warnings", "data", "fine-tuning", "evaluation", "generation", "compression", "export"]
    assert res["sections"] == expected + ["serving"]
    warnings = "\n".join(res["warnings"])
    assert "tokenizer/stats.json: not valid JSON" in warnings  # the malformed file is named, its section dropped
    assert "ledger.jsonl:2: 1 line(s)" in warnings and "finetune/cls/metrics.jsonl:2: 1 line(s)" in warnings
    md, page = res["md"].read_text(encoding="utf-8"), res["html"].read_text(encoding="utf-8")
    assert "## Tokenizer" not in md and "tokenizer/stats.json: not valid JSON" in page

    # Data accounting, straight from clean/stats.json.
    for row in (
        "| kept | 7 |",
        "| dropped: too_short | 2 |",
        "| deduplicated: exact | 2 |",
        "| quarantined: enc | 1 |",
    ):
        assert row in md
    assert "| total in | 12 |" in md
    # Classification table: every per-class and average number, formatted here from the source.
    m = CLASSIFY["metrics"]
    zh = m["per_class"]["唐诗"]
    assert f"| 唐诗 | {zh['precision']:.4f} | {zh['recall']:.4f} | {zh['f1']:.4f} | {zh['support']} |" in md
    macro = f"| macro avg | {m['precision_macro']:.4f} | {m['recall_macro']:.4f} | {m['f1_macro']:.4f} | {m['n']} |"
    assert macro in md and f"| accuracy |  |  | {m['accuracy']:.4f} | {m['n']} |" in md
    assert "read 11, used 10, skipped no_label 1" in md
    assert "](../evaluate/cls/confusion.png)" in md and base64.b64encode(FAKE_PNG).decode() in page
    # One compression table for both runs, with links to their reports.
    c8, c4 = COMPRESS["int8"]["change"], COMPRESS["wanda50-int4"]["change"]
    row8 = f"| int8 | int8 | 20.20 MB | 5.13 MB | {c8['size_ratio']:.3f}x | 85.2590 | 85.2435 | "
    assert row8 + f"{c8['ppl_delta_pct']:+.3f} % | – | {c8['decode_speedup']:.3f}x |" in md
    assert f"| wanda50-int4 | wanda 0.5 + int4 64 | 20.20 MB | 3.10 MB | {c4['size_ratio']:.3f}x |" in md
    assert "](../compress/int8/report.md)" in md and 'href="../compress/wanda50-int4/report.md"' in page
    # Fine-tuning curve plotted from the good lines; export; serving JSON as a table; generation.
    assert [p.name for p in res["plots"]] == ["loss_finetune_cls.png"] and "| final | 10 | 0.7500 | 0.6250 |" in md
    assert "| num_params | 5,048,576 |" in md and "AutoModelForCausalLM.from_pretrained" in md
    assert "| concurrency | tokens_per_s |" in md and "| 32 | 3,143.9 |" in md
    assert "《春晓》" in md and "《春晓》" in page and "唐诗" in page and 'charset="utf-8"' in page

    # User text never reaches either page as markup.
    assert "<script" not in page and page.count("&lt;script&gt;") == 4
    assert "<script" not in outside_fences(md) and "&lt;script&gt;" in md
    assert "````text\n" + XSS + "\n```\n````" in md  # a fence longer than the sample's own backticks
    assert external_refs(page) == []
    assert res["md"].with_name("report.html").is_file()


def test_wrong_shapes_cost_a_section_not_the_report(tmp_path):
    run = tmp_path / "run"
    write(run / "clean" / "stats.json", {"records": {"in": 3, "kept": "three", "dropped": {"x": 1}}})
    write(run / "compress" / "int8" / "report.json", [1, 2, 3])
    write(run / "evaluate" / "lm" / "metrics.json", {"task": "lm", "metrics": {"loss": 4.5, "bpb": None}})
    res = build_report(run, tmp_path / "out")
    assert res["sections"] == ["overview", "warnings", "evaluation"]
    warnings = "\n".join(res["warnings"])
    assert "Data: could not render clean/stats.json (TypeError" in warnings
    assert "compress/int8/report.json: expected a JSON dict, found list" in warnings
    md = res["md"].read_text(encoding="utf-8")
    assert "No ledger.jsonl" in md and "| loss | 4.5000 |" in md and "| bpb | – |" in md


def test_not_a_run_dir(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing"))):
        build_report(tmp_path / "missing")
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(ValueError, match="no ledger.jsonl and no stage folder"):
        build_report(tmp_path / "empty")
    write(tmp_path / "run" / "ledger.jsonl", "")
    write(tmp_path / "file", "x")
    with pytest.raises(ValueError, match="not a folder"):
        build_report(tmp_path / "run", tmp_path / "file")


def test_stage_writes_both_files_and_its_config(handmade, tmp_path, capsys):
    assert report_stage.NEEDS_TORCH is False
    cfg = report_stage.Config(run_dir=str(handmade), out=str(tmp_path / "page"))
    result = report_stage.run(cfg)
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'page' / 'report.md'}" in out and f"report: {tmp_path / 'page' / 'report.html'}" in out
    assert "warning: tokenizer/stats.json" in out and (tmp_path / "page" / "config.yaml").is_file()
    assert result["html"].is_file() and not (handmade / "report").exists()
    with pytest.raises(ValidationError):
        report_stage.Config(run_dir="x", bogus=1)
    with pytest.raises(ValueError, match="does not exist"):
        report_stage.run(report_stage.Config(run_dir=str(tmp_path / "nope")))
