"""End-to-end tests of `gptforge evaluate` through the CLI, each measured against a reference: lm loss against a
direct forward pass, bits per byte against loss and the text's bytes per token, classification metrics against
scikit-learn on the written predictions, chat loss and replies against the fine-tuning run's own validation numbers.
Also fine-tuning from a local Hugging Face folder (Llama, GPT-2) and evaluating the result, and the bad-label paths
(a label training never saw: exit 2 naming file:line, or counted with --bad_records=skip).
"""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from gptforge.data.readers import read_documents
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.train import checkpoint as ck
from gptforge.train.models import load_for_inference
from tests.stages.ft_helpers import (
    build_chat_run,
    build_classify_run,
    finetune_args,
    read_json,
    read_jsonl,
    run_cli,
    shared_run,
    write_jsonl,
)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, corpus, trained_run):
    return shared_run(tmp_path_factory, "classify", build_classify_run(corpus, trained_run / "pretrain"))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, corpus, trained_run):
    return shared_run(tmp_path_factory, "chat", build_chat_run(corpus, trained_run / "pretrain"))


def evaluate(capsys, ckpt, data, run_dir, *extra):
    return run_cli(capsys, "evaluate", f"--ckpt={ckpt}", f"--data={data}", f"--run_dir={run_dir}", *extra)


# --- lm -----------------------------------------------------------------------------------------------------------


def test_lm_loss_matches_a_direct_forward_pass_and_bpb_follows(tmp_path, corpus, trained_run, capsys):
    text = (corpus / "en" / "sonnets.txt").read_text(encoding="utf-8")[-3000:]
    data = tmp_path / "val.txt"
    data.write_text(text, encoding="utf-8")
    rc, out, err = evaluate(capsys, trained_run / "pretrain", data, tmp_path)
    assert rc == 0, err
    result = read_json(tmp_path / "evaluate" / "lm" / "metrics.json")
    m = result["metrics"]
    assert result["task"] == "lm" and result["checkpoint"] == str(ck.resolve(trained_run / "pretrain"))
    assert m["ppl"] == pytest.approx(math.exp(m["loss"])) and "| bpb |" in out

    # reference: [bos] text [eos] cut into windows of block_size + 1 tokens overlapping by one, mean cross-entropy
    model, tok, _ = load_for_inference(trained_run / "pretrain")
    (doc,) = [d.text for d in read_documents(data)]
    ids = torch.tensor([tok.bos_id, *tok.encode(doc), tok.eos_id])
    T = model.config.block_size
    n = (len(ids) - 1) // T
    x = torch.stack([ids[i * T : (i + 1) * T] for i in range(n)])
    y = torch.stack([ids[i * T + 1 : (i + 1) * T + 1] for i in range(n)])
    with torch.no_grad():
        logits, _ = model(x)
    assert m["loss"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    bytes_per_token = len(doc.encode("utf-8")) / len(tok.encode(doc))
    assert m["bpb"] == pytest.approx(m["loss"] / math.log(2) / bytes_per_token, rel=1e-3)

    assert (tmp_path / "evaluate" / "lm" / "metrics.md").is_file() and (
        tmp_path / "evaluate" / "lm" / "config.yaml"
    ).is_file()
    assert [e["stage"] for e in read_jsonl(tmp_path / "ledger.jsonl")] == ["evaluate/lm"]


# --- classify -----------------------------------------------------------------------------------------------------


def test_classify_metrics_equal_sklearn_on_the_predictions(tmp_path, cls_run, corpus, capsys):
    sk = pytest.importorskip("sklearn.metrics")
    recs = read_jsonl(cls_run / "cls.jsonl")[:24]
    # Six deliberately mislabelled lines, so that the metrics are not all 1.0 and a wrong formula shows.
    flipped = [{"text": r["text"], "label": "en" if r["label"] == "zh" else "zh"} for r in recs[:6]]
    data = write_jsonl(tmp_path / "test.jsonl", recs[6:] + flipped)
    rc, _, err = evaluate(capsys, cls_run / "run" / "finetune" / "classify", data, tmp_path)
    assert rc == 0, err
    out = tmp_path / "evaluate" / "classify"
    m = read_json(out / "metrics.json")["metrics"]
    preds = read_jsonl(out / "predictions.jsonl")
    assert [(p["text"], p["label"]) for p in preds] == [(r["text"], r["label"]) for r in recs[6:] + flipped]
    y, p = [x["label"] for x in preds], [x["predicted"] for x in preds]
    assert m["n"] == 24 and 0 < m["accuracy"] < 1
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    for avg in ("macro", "micro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(sk.f1_score(y, p, average=avg)), avg
        assert m[f"precision_{avg}"] == pytest.approx(sk.precision_score(y, p, average=avg, zero_division=0)), avg
        assert m[f"recall_{avg}"] == pytest.approx(sk.recall_score(y, p, average=avg)), avg
    confusion = read_json(out / "confusion.json")
    assert confusion["matrix"] == sk.confusion_matrix(y, p, labels=confusion["labels"]).tolist()
    assert (out / "confusion.png").is_file() and (out / "metrics.md").is_file()


def test_unseen_label_is_an_error_or_a_counted_skip(tmp_path, cls_run, capsys):
    recs = read_jsonl(cls_run / "cls.jsonl")[:6]
    data = write_jsonl(
        tmp_path / "test.jsonl", recs[:2] + [{"text": "Bonjour tout le monde", "label": "fr"}] + recs[2:]
    )
    ckpt = cls_run / "run" / "finetune" / "classify"
    rc, _, err = evaluate(capsys, ckpt, data, tmp_path)
    assert rc == 2 and len(err.splitlines()) == 1 and f"{data}:3" in err and "'fr' was not seen in training" in err
    rc, _, err = evaluate(capsys, ckpt, data, tmp_path, "--bad_records=skip")
    assert rc == 0, err
    result = read_json(tmp_path / "evaluate" / "classify" / "metrics.json")
    assert result["metrics"]["n"] == 6 and result["data_report"]["data"]["skipped"] == {"unseen_label": 1}
    assert result["data_report"]["data"]["examples"]["unseen_label"] == [f"{data}:3"]


def test_unseen_label_skip_report_adds_up(tmp_path, cls_run, capsys):
    recs = read_jsonl(cls_run / "cls.jsonl")[:6]
    data = write_jsonl(tmp_path / "test.jsonl", recs + [{"text": "Bonjour", "label": "fr"}])
    rc, _, err = evaluate(capsys, cls_run / "run" / "finetune" / "classify", data, tmp_path, "--bad_records=skip")
    assert rc == 0, err
    rep = read_json(tmp_path / "evaluate" / "classify" / "metrics.json")["data_report"]["data"]
    assert rep["used"] + sum(rep["skipped"].values()) == rep["read"] == 7


def test_task_that_does_not_fit_the_checkpoint_is_refused(tmp_path, cls_run, capsys):
    rc, _, err = evaluate(
        capsys, cls_run / "run" / "finetune" / "classify", cls_run / "cls.jsonl", tmp_path, "--task=lm"
    )
    assert rc == 2 and "task=lm does not fit" in err and "classify model" in err
    assert not (tmp_path / "evaluate").exists()


# --- chat ---------------------------------------------------------------------------------------------------------


def test_chat_metrics_and_replies_match_the_finetune_run(tmp_path, chat_run, capsys):
    ft = chat_run / "run" / "finetune" / "chat"
    rc, out, err = evaluate(capsys, ft, chat_run / "chat_val.jsonl", tmp_path, "--samples=2")
    assert rc == 0, err
    result = read_json(tmp_path / "evaluate" / "chat" / "metrics.json")
    m = result["metrics"]
    # same checkpoint, same validation file, float32 both times: the fine-tuning run's own validation loss
    assert m["loss"] == pytest.approx(read_json(ft / "summary.json")["val"]["val_loss"], rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(m["loss"])) and result["data_report"]["data"]["used"] == 8
    samples = read_jsonl(tmp_path / "evaluate" / "chat" / "samples.jsonl")
    refs = read_jsonl(chat_run / "chat_val.jsonl")[:2]
    assert [s["reference"] for s in samples] == [r["messages"][1]["content"] for r in refs]
    assert [s["reply"] for s in samples] == [s["reply"] for s in read_jsonl(ft / "samples.jsonl")[:2]]  # greedy
    assert out.count("reference:") == 2


# --- fine-tuning from a Hugging Face folder -------------------------------------------------------------------------


def _hf_folder(kind: str, root, tok: Tokenizer, tok_file):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **ids,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **ids)
        )
    folder = root / kind
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(tok_file, folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chat_finetune_from_hf_folder_then_evaluate(kind, tmp_path, chat_run, tokenizer_run, capsys):
    tok_file = tokenizer_run / "tokenizer" / "tokenizer.json"
    folder = _hf_folder(kind, tmp_path, Tokenizer.load(tok_file), tok_file)
    assert not list(folder.glob("*.bin"))  # safetensors only
    val = chat_run / "chat_val.jsonl"
    args = ["--task=chat", f"--val_file={val}", "--epochs=0", "--train.max_steps=4", "--train.lr=3e-3", "--samples=1"]
    rc, out, err = run_cli(capsys, *finetune_args(tmp_path / "run", folder, chat_run / "chat_train.jsonl", *args))
    assert rc == 0, err
    assert f"init: hf model from {folder}" in out
    ft = tmp_path / "run" / "finetune" / "chat"
    meta = ck.read_meta(ck.resolve(ft))
    assert meta["init"]["kind"] == "hf" and meta["init"]["model_type"] == kind
    assert meta["model"]["pos"] == ("rope" if kind == "llama" else "learned")
    summary = read_json(ft / "summary.json")
    rc, _, err = evaluate(capsys, ft, val, tmp_path / "run", "--samples=1")
    assert rc == 0, err
    m = read_json(tmp_path / "run" / "evaluate" / "chat" / "metrics.json")["metrics"]
    assert m["loss"] == pytest.approx(summary["val"]["val_loss"], rel=1e-5)
    assert len(read_jsonl(tmp_path / "run" / "evaluate" / "chat" / "samples.jsonl")) == 1
