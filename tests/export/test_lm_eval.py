"""EleutherAI lm-evaluation-harness runs on an exported folder, offline, as a stock `--model hf`: a local
multiple-choice task (yaml + jsonl written here) gives an accuracy, and every log-likelihood the harness computed
equals the one our own model computes for the same context/continuation split.

Slow (about 15 s: lm-eval imports datasets, transformers and torch in a subprocess). Run it with lm-eval installed,
e.g. in an overlay venv: /tmp/venv-lmeval/bin/python -m pytest -m slow tests/export/test_lm_eval.py"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gptforge.export.hf import export_hf
from tests.export.conftest import VARIANTS, make_model

TASK = "gptforge_tiny_mc"
DOCS = [
    {"question": "春眠不觉晓，处处闻", "choices": ["啼鸟", "明月", "风雨"], "answer": 0},
    {"question": "The quick brown", "choices": ["fox", "dog", "summer"], "answer": 0},
    {"question": "床前明月光，疑是地上", "choices": ["霜", "光"], "answer": 0},
    {"question": "Shall I compare thee to a", "choices": ["summer's day?", "lazy dog."], "answer": 0},
]


def write_task(folder, data_file) -> None:
    data_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
        encoding="utf-8",
    )


def our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context), with lm-eval's split: trailing spaces of the context move to the
    continuation, and the continuation's tokens are those of the whole string after the context's."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0][0].float()
    logp = logits.log_softmax(-1)[len(ctx) - 1 :]
    return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())


@pytest.mark.slow
def test_lm_eval_harness_scores_the_exported_folder(tmp_path, tok):
    pytest.importorskip("lm_eval")
    model = make_model(tok, **VARIANTS["llama-gqa"])
    folder = tmp_path / "hf"
    export_hf(model, tok, folder)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, tmp_path / "docs.jsonl")
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32"]
    cmd += ["--include_path", str(tasks), "--tasks", TASK, "--device", "cpu", "--batch_size", "1"]
    cmd += ["--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][TASK]
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    assert len(samples) == len(DOCS)
    correct = 0
    for s in samples:
        args = [s["arguments"][k] for k in sorted(s["arguments"], key=lambda k: int(k.rsplit("_", 1)[1]))]
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        ours = [our_loglikelihood(model, tok, a["arg_0"], a["arg_1"]) for a in args]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += max(range(len(ours)), key=ours.__getitem__) == s["doc"]["answer"]
    assert results["acc,none"] == pytest.approx(correct / len(DOCS))
