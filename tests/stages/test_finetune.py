"""End-to-end tests of `gptforge finetune` through the CLI, on tiny data built from the test corpus and the tiny
pretrained run of conftest: classify (string and integer labels), chat (loss on assistant tokens only), lm, LoRA,
early stopping, cross-validation, hyperparameter search, augmentation, and bad input (exit 2, one line naming
file:line; or, with --bad_records=skip, counted by reason). Budgets are a few dozen steps of a 0.16M model.

Checks prefer references to eyeballing: predictions.jsonl against the input file and metrics.json, best.json against
metrics.jsonl, LoRA base weights against the pretrained checkpoint, chat loss targets against the tokenized replies.
"""

import math
import re
import statistics
from collections import Counter

import numpy as np
import pytest
from safetensors.torch import load_file

from gptforge.config import load
from gptforge.stages import finetune
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.train import checkpoint as ck
from gptforge.train import tasks
from gptforge.train.models import load_for_inference
from tests.stages.ft_helpers import (
    build_chat_run,
    build_classify_run,
    chat_records,
    classify_records,
    finetune_args,
    read_json,
    read_jsonl,
    run_cli,
    shared_run,
    write_jsonl,
)

CLASSIFY_OUTPUTS = (
    "checkpoints/best.json",
    "predictions.jsonl",
    "metrics.json",
    "metrics.md",
    "confusion.png",
    "confusion.json",
    "summary.json",
    "data_report.json",
    "config.yaml",
    "loss.png",
    "metrics.jsonl",
)
TINY_BUDGET = ["--epochs=0", "--train.max_steps=4", "--evals_per_epoch=0", "--train.eval_every=2"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, corpus, trained_run):
    return shared_run(tmp_path_factory, "classify", build_classify_run(corpus, trained_run / "pretrain"))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, corpus, trained_run):
    return shared_run(tmp_path_factory, "chat", build_chat_run(corpus, trained_run / "pretrain"))


@pytest.fixture(scope="module")
def cls_file(tmp_path_factory, corpus):
    return write_jsonl(tmp_path_factory.mktemp("clsdata") / "cls.jsonl", classify_records(corpus, 30))


# --- classify -------------------------------------------------------------------------------------------------


def test_classify_writes_every_artifact_and_learns(cls_run):
    out = cls_run / "run" / "finetune" / "classify"
    for name in CLASSIFY_OUTPUTS:
        assert (out / name).is_file(), name
    summary = read_json(out / "summary.json")
    assert summary["data"] == {"train_items": 60, "val_items": 20} and summary["labels"] == ["en", "zh"]
    assert read_json(out / "data_report.json")["train"]["read"] == 80

    # predictions: one line per validation example, labels as in the input file, probabilities summing to 1
    inputs = {f"{cls_run / 'cls.jsonl'}:{i}": r for i, r in enumerate(read_jsonl(cls_run / "cls.jsonl"), 1)}
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 20 and len({p["source"] for p in preds}) == 20
    for p in preds:
        assert inputs[p["source"]] == {"text": p["text"], "label": p["label"]}
        assert math.isclose(sum(p["probs"].values()), 1.0, abs_tol=1e-5)
        assert p["predicted"] == max(p["probs"], key=p["probs"].get) and p["correct"] == (p["predicted"] == p["label"])
    metrics = read_json(out / "metrics.json")
    accuracy = sum(p["correct"] for p in preds) / len(preds)
    assert metrics["accuracy"] == pytest.approx(accuracy) == pytest.approx(summary["val"]["val_accuracy"])
    assert accuracy >= 0.9  # Chinese vs English lines: trivially separable
    confusion = read_json(out / "confusion.json")
    assert confusion["labels"] == ["en", "zh"] and sum(map(sum, confusion["matrix"])) == 20
    assert np.trace(np.array(confusion["matrix"])) == sum(p["correct"] for p in preds)

    # best.json names the first evaluation with the best f1_macro, and that checkpoint exists
    best = read_json(out / "checkpoints" / "best.json")
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "val_f1_macro" in r]
    top = max(r["val_f1_macro"] for r in evals)
    assert best["val_f1_macro"] == top == summary["best"]
    assert best["step"] == next(r["step"] for r in evals if r["val_f1_macro"] == top) == summary["best_step"]
    meta = ck.read_meta(out / "checkpoints" / best["checkpoint"])
    assert meta["step"] == best["step"] and meta["task"] == "classify"
    assert meta["labels"] == {"kind": "str", "classes": ["en", "zh"]} and meta["head"]["n_classes"] == 2

    cfg = load(finetune.Config, out / "config.yaml")
    assert cfg.task == "classify" and cfg.val_fraction == 0.25 and cfg.train.lr == 3e-3
    ledger = read_jsonl(cls_run / "run" / "ledger.jsonl")
    assert [e["stage"] for e in ledger] == ["finetune/classify"]


def test_existing_checkpoints_are_refused(cls_run, trained_run, capsys):
    out = cls_run / "run" / "finetune" / "classify"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "checkpoints").iterdir())
    best = (out / "checkpoints" / "best.json").read_bytes()
    args = finetune_args(cls_run / "run", trained_run / "pretrain", cls_run / "cls.jsonl", "--task=classify")
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "already holds checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "checkpoints").iterdir()) == before
    assert (out / "checkpoints" / "best.json").read_bytes() == best


def test_integer_labels_stay_integers(tmp_path, corpus, trained_run, capsys):
    data = write_jsonl(tmp_path / "int.jsonl", classify_records(corpus, 12, int_labels=True))
    rc, _, err = run_cli(
        capsys,
        *finetune_args(
            tmp_path, trained_run / "pretrain", data, "--task=classify", "--val_fraction=0.25", *TINY_BUDGET
        ),
    )
    assert rc == 0, err
    out = tmp_path / "finetune" / "classify"
    meta = ck.read_meta(ck.resolve(out))
    assert meta["labels"] == {"kind": "int", "classes": [0, 1]}
    assert read_json(out / "summary.json")["labels"] == ["0", "1"]
    assert {str(p["label"]) for p in read_jsonl(out / "predictions.jsonl")} == {"0", "1"}
    # Evaluating with the string "1" is refused: it is not the integer 1 the model was trained on.
    write_jsonl(tmp_path / "str.jsonl", [{"text": "hello", "label": 0}, {"text": "你好", "label": "1"}])
    rc, _, err = run_cli(
        capsys, "evaluate", f"--ckpt={out}", f"--data={tmp_path / 'str.jsonl'}", f"--run_dir={tmp_path}"
    )
    assert rc == 2 and f"{tmp_path / 'str.jsonl'}:2" in err and "label '1' was not seen" in err and "int" in err


def test_augmented_copies_only_in_training(tmp_path, cls_run, trained_run, capsys):
    """Same file, split and seed as the shared classify run, plus 2 augmented copies per training record."""
    args = ["--task=classify", "--val_fraction=0.25", "--augment.n_per_record=2", *TINY_BUDGET]
    rc, out, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", cls_run / "cls.jsonl", *args))
    assert rc == 0, err
    plain = read_json(cls_run / "run" / "finetune" / "classify" / "summary.json")["data"]
    data = read_json(tmp_path / "finetune" / "classify" / "summary.json")["data"]
    copies = data["augmented_copies"]
    assert data["val_items"] == plain["val_items"] == 20 and data["train_items"] == plain["train_items"] == 60
    assert 0 < copies <= 2 * 60 and data["augment"]["records"] == 60
    assert f"classify: {60 + copies} training examples" in out
    preds = read_jsonl(tmp_path / "finetune" / "classify" / "predictions.jsonl")
    plain_preds = read_jsonl(cls_run / "run" / "finetune" / "classify" / "predictions.jsonl")
    assert {p["source"] for p in preds} == {p["source"] for p in plain_preds}  # the same 20 originals, no copies


def test_early_stopping_on_accuracy(tmp_path, cls_file, trained_run, capsys):
    args = ["--task=classify", "--monitor=accuracy", "--train.early_stop_patience=1", "--val_fraction=0.25"]
    args += ["--epochs=0", "--train.max_steps=60", "--evals_per_epoch=0", "--train.eval_every=3", "--train.lr=3e-3"]
    rc, out, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", cls_file, *args))
    assert rc == 0, err
    ft = tmp_path / "finetune" / "classify"
    evals = [(r["step"], r["val_accuracy"]) for r in read_jsonl(ft / "metrics.jsonl") if "val_accuracy" in r]
    acc = [a for _, a in evals]
    b = acc.index(max(acc))
    # patience 1: every evaluation up to the best improved, the one after it did not, and training stopped there
    assert all(x < y for x, y in zip(acc[:b], acc[1 : b + 1])) and len(evals) == b + 2 and acc[-1] <= acc[b]
    summary = read_json(ft / "summary.json")
    assert summary["steps"] == evals[-1][0] < 60 and "early stop: val_accuracy" in summary["stop_reason"]
    best = read_json(ft / "checkpoints" / "best.json")
    assert best["step"] == evals[b][0] == summary["best_step"] and best["val_accuracy"] == acc[b]
    assert ck.read_meta(ck.best(ft / "checkpoints"))["step"] == evals[b][0]
    assert summary["val"]["val_accuracy"] == acc[b]  # the final metrics are the best checkpoint's


# --- chat and lm ------------------------------------------------------------------------------------------------


def _loss_targets(rows) -> list[tuple]:
    """The trained target ids of every packed sample (one tuple per segment)."""
    out = []
    for tgt, seg in zip(rows.targets, rows.segments):
        for s in np.unique(seg):
            t = tgt[(seg == s) & (tgt != -100)]
            if len(t):
                out.append(tuple(int(x) for x in t))
    return out


def test_chat_loss_is_on_assistant_tokens_only(tmp_path, corpus, tokenizer_run):
    tok = Tokenizer.load(tokenizer_run / "tokenizer" / "tokenizer.json")
    end = tok.special_ids["<|end|>"]

    def prepare(records, name):
        f = write_jsonl(tmp_path / name, records)
        cfg = finetune.Config(task="chat", train_file=str(f))
        prep = tasks.prepare(cfg, tok, 64)
        n = len(prep.items)
        split = tasks.make_split(prep, np.arange(n - 4), np.arange(n - 4, n), cfg, tok, 64, 0)
        return split.train, split.val["rows"]

    records = chat_records(corpus, 20)
    rows = prepare(records, "short.jsonl")
    expected = Counter(tuple(tok.encode(r["messages"][1]["content"]) + [end]) for r in records)
    assert Counter(_loss_targets(rows[0]) + _loss_targets(rows[1])) == expected
    # A longer question adds input tokens but not a single loss token.
    longer = prepare(chat_records(corpus, 20, user="请背诵第{i}句诗，只要这一句，谢谢！"), "long.jsonl")
    assert sum(r.real_tokens for r in longer) > sum(r.real_tokens for r in rows)
    assert Counter(_loss_targets(longer[0]) + _loss_targets(longer[1])) == expected


def test_chat_run_samples_load_and_generate(chat_run, capsys):
    out = chat_run / "run" / "finetune" / "chat"
    summary = read_json(out / "summary.json")
    val = summary["val"]
    assert math.isfinite(val["val_loss"]) and val["val_ppl"] == pytest.approx(math.exp(val["val_loss"]))
    assert summary["data"]["train_items"] == 40 and summary["data"]["val_items"] == 8
    assert read_json(out / "checkpoints" / "best.json")["val_loss"] == summary["best"]
    samples = read_jsonl(out / "samples.jsonl")
    refs = read_jsonl(chat_run / "chat_val.jsonl")[:3]
    assert [(s["prompt"], s["reference"]) for s in samples] == [
        (r["messages"][0]["content"], r["messages"][1]["content"]) for r in refs
    ]
    assert all(isinstance(s["reply"], str) for s in samples)
    model, tok, meta = load_for_inference(out)
    assert meta["task"] == "chat" and meta["lora"] == {"rank": 0} and not model.training
    assert type(model).__name__ == "GPT" and tok.sha256() == meta["tokenizer_sha256"]
    rc, printed, err = run_cli(capsys, "generate", f"--ckpt={out}", "--prompt=第3句？", "--max_new_tokens=6")
    assert rc == 0, err
    assert "第3句" in printed


def test_lm_continued_pretraining_reports_finite_bpb(tmp_path, corpus, trained_run, capsys):
    text = (corpus / "en" / "sonnets.txt").read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:4000], encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[-1500:], encoding="utf-8")
    args = ["--task=lm", f"--val_file={tmp_path / 'val.txt'}", "--epochs=2", "--train.lr=3e-3"]
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", tmp_path / "train.txt", *args))
    assert rc == 0, err
    val = read_json(tmp_path / "finetune" / "lm" / "summary.json")["val"]
    assert set(val) == {"val_loss", "val_ppl", "val_bpb"} and all(math.isfinite(v) for v in val.values())
    tok = Tokenizer.load(tmp_path / "finetune" / "lm" / "tokenizer.json")
    bytes_per_token = len(text[-1500:].encode("utf-8")) / len(tok.encode(text[-1500:]))
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / math.log(2) / bytes_per_token, rel=1e-3)
    # Continued pretraining helps on held-out text of the same domain: the base model does worse.
    rc, _, err = run_cli(
        capsys,
        "evaluate",
        f"--ckpt={trained_run / 'pretrain'}",
        f"--data={tmp_path / 'val.txt'}",
        f"--run_dir={tmp_path}",
    )
    assert rc == 0, err
    base = read_json(tmp_path / "evaluate" / "lm" / "metrics.json")["metrics"]
    assert val["val_loss"] < base["loss"]


def test_lm_holds_out_part_of_a_single_text_file(tmp_path, corpus, trained_run, capsys):
    text = (corpus / "en" / "sonnets.txt").read_text(encoding="utf-8")[:6000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    rc, _, err = run_cli(
        capsys, *finetune_args(tmp_path, trained_run / "pretrain", tmp_path / "train.txt", "--task=lm", *TINY_BUDGET)
    )
    assert rc == 0, err


# --- LoRA -------------------------------------------------------------------------------------------------------


def test_lora_trains_adapters_and_head_only_and_evaluate_agrees(tmp_path, corpus, trained_run, capsys):
    recs = classify_records(corpus, 32)
    train, val = write_jsonl(tmp_path / "train.jsonl", recs[:48]), write_jsonl(tmp_path / "val.jsonl", recs[48:])
    args = ["--task=classify", f"--val_file={val}", "--lora.rank=4", "--epochs=2", "--train.lr=3e-3"]
    rc, out, err = run_cli(capsys, *finetune_args(tmp_path / "run", trained_run / "pretrain", train, *args))
    assert rc == 0, err
    ft = tmp_path / "run" / "finetune" / "classify"
    best = ck.resolve(ft)
    assert ck.read_meta(best)["lora"]["rank"] == 4
    sd = load_file(best / "model.safetensors")
    adapters = {k: v for k, v in sd.items() if ".lora_" in k}
    head = {k: v for k, v in sd.items() if k.startswith("head.")}
    m = re.search(r"LoRA rank 4 on (\d+) layers: ([\d,]+) of ([\d,]+) parameters trained", out)
    assert m, out
    layers, trained, total = (int(g.replace(",", "")) for g in m.groups())
    assert layers == len(adapters) // 2 > 0 and set(head) == {"head.weight", "head.bias"}
    assert trained == sum(v.numel() for v in [*adapters.values(), *head.values()])
    assert total == sum(v.numel() for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B"))  # the adapters did learn
    # Everything else is bit-for-bit the pretrained model the run started from.
    pre = load_file(ck.resolve(trained_run / "pretrain") / "model.safetensors")
    frozen = {k.removeprefix("gpt.").replace(".base.", "."): v for k, v in sd.items() if k not in adapters | head}
    assert set(frozen) == set(pre) and all(v.equal(pre[k]) for k, v in frozen.items())

    model, _, meta = load_for_inference(ft)
    plain = load_for_inference(trained_run / "pretrain")[0].state_dict()
    assert meta["lora"]["rank"] == 4 and set(model.state_dict()) == {f"gpt.{k}" for k in plain} | set(head)  # merged

    summary = read_json(ft / "summary.json")["val"]
    assert summary["val_accuracy"] >= 0.8
    rc, _, err = run_cli(capsys, "evaluate", f"--ckpt={ft}", f"--data={val}", f"--run_dir={tmp_path / 'ev'}")
    assert rc == 0, err
    ev = read_json(tmp_path / "ev" / "evaluate" / "classify" / "metrics.json")["metrics"]
    assert ev["n"] == 16 and ev["accuracy"] == summary["val_accuracy"] and ev["f1_macro"] == summary["val_f1_macro"]
    merged = {
        p["source"]: p["probs"] for p in read_jsonl(tmp_path / "ev" / "evaluate" / "classify" / "predictions.jsonl")
    }
    for p in read_jsonl(ft / "predictions.jsonl"):
        assert merged[p["source"]] == pytest.approx(p["probs"], abs=1e-4)


# --- cross-validation and search ----------------------------------------------------------------------------------


def test_cross_validation_reports_mean_std_values(tmp_path, cls_file, trained_run, capsys):
    rc, _, err = run_cli(
        capsys,
        *finetune_args(tmp_path, trained_run / "pretrain", cls_file, "--task=classify", "--cv.folds=3", *TINY_BUDGET),
    )
    assert rc == 0, err
    ft = tmp_path / "finetune" / "classify"
    cv = read_json(ft / "cv" / "cv.json")
    assert cv["folds"] == 3 and read_json(ft / "summary.json")["cv"] == cv["metrics"]
    for key in ("val_accuracy", "val_f1_macro"):
        s = cv["metrics"][key]
        assert len(s["values"]) == 3 and all(0 <= v <= 1 for v in s["values"])
        assert s["mean"] == pytest.approx(statistics.fmean(s["values"]))
        assert s["std"] == pytest.approx(statistics.stdev(s["values"]))
    # each fold's value is its best checkpoint's score
    folds = [read_json(ft / "cv" / f"fold-{k}" / "checkpoints" / "best.json") for k in range(3)]
    assert [f["val_f1_macro"] for f in folds] == cv["metrics"]["val_f1_macro"]["values"]
    assert "val_f1_macro" in (ft / "cv" / "cv.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "method,flags,lrs",
    [
        ("grid", ["--search.lr=[1e-3,3e-3]"], [1e-3, 3e-3]),
        ("random", ["--search.lr=[1e-3,2e-3,3e-3]", "--search.trials=2", "--search.seed=3"], [1e-3, 2e-3, 3e-3]),
    ],
)
def test_search_ranks_trials_and_saves_the_best_config(method, flags, lrs, tmp_path, cls_file, trained_run, capsys):
    args = ["--task=classify", f"--search.method={method}", *flags, "--monitor=loss", *TINY_BUDGET]
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", cls_file, *args))
    assert rc == 0, err
    search = tmp_path / "finetune" / "classify" / "search"
    rows = read_jsonl(search / "results.jsonl")
    assert [r["trial"] for r in rows] == [0, 1]
    tried = [r["params"]["lr"] for r in rows]
    assert (tried == lrs) if method == "grid" else (len(set(tried)) == 2 and set(tried) <= set(lrs))
    by_loss = sorted(rows, key=lambda r: r["metrics"]["val_loss"])
    table = (search / "results.md").read_text(encoding="utf-8").splitlines()[2:]
    assert [int(line.strip("|").split("|")[1]) for line in table] == [r["trial"] for r in by_loss]  # ranked
    best = load(finetune.Config, search / "best.yaml")
    assert best.train.lr == by_loss[0]["params"]["lr"] and best.search.method == "none"
    assert read_json(tmp_path / "finetune" / "classify" / "summary.json")["search"]["trial"] == by_loss[0]["trial"]


# --- bad input ----------------------------------------------------------------------------------------------------


def _with_bad(records: list, bad: dict[int, object]) -> list:
    """records with bad[i] inserted so that it lands on line i (1-based)."""
    out = list(records)
    for line in sorted(bad):
        out.insert(line - 1, bad[line])
    return out


BAD = {
    "missing_label": ("classify", {"text": "no label here"}, "missing_label"),
    "mixed_labels": ("classify", {"text": "an integer label", "label": 3}, "labels mix types"),
    "invalid_json": ("classify", '{"text": "oops", "label": ', "invalid_json"),
    "no_assistant_turn": ("chat", {"messages": [{"role": "user", "content": "alone"}]}, "no_assistant_turn"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_is_one_line_naming_file_and_line(case, tmp_path, corpus, trained_run, capsys):
    task, bad, needle = BAD[case]
    good = classify_records(corpus, 8) if task == "classify" else chat_records(corpus, 16)
    f = write_jsonl(tmp_path / "data.jsonl", _with_bad(good, {6: bad}))
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", f, f"--task={task}", *TINY_BUDGET))
    assert rc == 2 and len(err.splitlines()) == 1 and f"{f}:6" in err and needle in err, err
    assert not (tmp_path / "finetune" / task / "checkpoints").exists()


def test_invalid_json_names_the_column(tmp_path, corpus, trained_run, capsys):
    f = write_jsonl(tmp_path / "data.jsonl", _with_bad(classify_records(corpus, 8), {6: BAD["invalid_json"][1]}))
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", f, "--task=classify"))
    assert rc == 2 and "column 27" in err, err


def test_skip_counts_bad_classify_records_and_truncates_long_ones(tmp_path, corpus, trained_run, capsys):
    long_text = " ".join(r["text"] for r in classify_records(corpus, 20))  # far more than 64 tokens
    bad = {3: {"text": "no label"}, 7: BAD["invalid_json"][1], 10: [1, 2], 12: {"text": long_text, "label": "en"}}
    f = write_jsonl(tmp_path / "data.jsonl", _with_bad(classify_records(corpus, 12), bad))
    args = ["--task=classify", "--bad_records=skip", "--val_fraction=0.25", *TINY_BUDGET]
    rc, out, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", f, *args))
    assert rc == 0, err
    rep = read_json(tmp_path / "finetune" / "classify" / "data_report.json")["train"]
    assert rep["read"] == 28 and rep["used"] == 25
    assert rep["skipped"] == {"invalid_json": 1, "missing_label": 1, "not_an_object": 1}
    assert rep["examples"]["missing_label"] == [f"{f}:3"] and rep["examples"]["invalid_json"] == [f"{f}:7"]
    assert rep["tokenize"]["truncated"] == 1 and rep["tokenize"]["examples"]["truncated"] == [f"{f}:12"]
    data = read_json(tmp_path / "finetune" / "classify" / "summary.json")["data"]
    assert data["train_items"] + data["val_items"] == 25  # the truncated example is kept
    assert "skipped invalid_json=1, missing_label=1, not_an_object=1, truncated to the context: 1" in out
    rc, _, err = run_cli(
        capsys, *finetune_args(tmp_path, trained_run / "pretrain", f, *args, "--too_long=error", "--overwrite")
    )
    assert rc == 2 and f"{f}:12: too_long" in err and len(err.splitlines()) == 1


def test_skip_counts_bad_conversations_and_skips_long_ones(tmp_path, corpus, trained_run, capsys):
    reply = "".join(r["messages"][1]["content"] for r in chat_records(corpus, 6))  # far more than 64 tokens
    long_chat = {"messages": [{"role": "user", "content": "全部？"}, {"role": "assistant", "content": reply}]}
    bad = {3: {"messages": [{"role": "user", "content": "alone"}]}, 6: "not json", 9: long_chat}
    f = write_jsonl(tmp_path / "chat.jsonl", _with_bad(chat_records(corpus, 20), bad))
    args = ["--task=chat", "--bad_records=skip", "--samples=0", *TINY_BUDGET]
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", f, *args))
    assert rc == 0, err
    rep = read_json(tmp_path / "finetune" / "chat" / "data_report.json")["train"]
    assert rep["read"] == 23 and rep["used"] == 20 and rep["truncated"] == 0
    assert rep["skipped"] == {"invalid_json": 1, "no_assistant_turn": 1, "too_long": 1}
    assert rep["examples"]["too_long"] == [f"{f}:9"]
    rc, _, err = run_cli(
        capsys, *finetune_args(tmp_path, trained_run / "pretrain", f, *args, "--too_long=error", "--overwrite")
    )
    assert rc == 2 and f"{f}:9: too_long" in err and len(err.splitlines()) == 1


def test_skip_counts_a_label_of_the_wrong_type(tmp_path, corpus, trained_run, capsys):
    f = write_jsonl(tmp_path / "data.jsonl", _with_bad(classify_records(corpus, 8), {6: BAD["mixed_labels"][1]}))
    args = ["--task=classify", "--bad_records=skip", *TINY_BUDGET]
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path, trained_run / "pretrain", f, *args))
    assert rc == 0, err
    rep = read_json(tmp_path / "finetune" / "classify" / "data_report.json")["train"]
    assert rep["read"] == 17 and sum(rep["skipped"].values()) == 1
