"""Shared pieces of the finetune/evaluate stage tests: tiny task files built from the test corpus, the CLI call, and
a per-session cache of the two runs both test files read (a trained classifier and a chat model).

Trade-off: pytest cannot share a session fixture between two test modules without a conftest.py, so the shared runs
are cached on disk under the session's base temp folder (`shared_run`). A `.done` marker is written last, so a run
that failed half-way is rebuilt rather than reused.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from gptforge.cli import main

# Fast, deterministic flags for every fine-tuning call: float32 so a checkpoint evaluated later (evaluate defaults to
# float32) gives exactly the numbers the fine-tuning run reported.
FAST = ["--progress=false", "--train.micro_batch_size=4", "--dtype=float32"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr stripped) of an in-process `gptforge ...` call."""
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def run_quiet(*args: str) -> tuple[int, str]:
    """(exit status, stdout + stderr) without pytest's capsys, for module-scoped fixtures."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main([str(a) for a in args])
    return rc, buf.getvalue()


def finetune_args(run_dir: Path, init: Path, train_file: Path, *extra: str) -> list[str]:
    return ["finetune", f"--run_dir={run_dir}", f"--init={init}", f"--train_file={train_file}", *FAST, *extra]


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line; a str item is written verbatim (for malformed lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def zh_lines(corpus: Path, n: int) -> list[str]:
    """n distinct short verse lines (6-16 characters) of the Song poems, titles and authors left out."""
    out: list[str] = []
    for rec in read_jsonl(corpus / "zh" / "song100.jsonl"):
        for line in rec["text"].splitlines()[2:]:
            line = line.strip()
            if 6 <= len(line) <= 16 and line not in out:
                out.append(line)
    assert len(out) >= n, f"the corpus has only {len(out)} short Chinese lines"
    return out[:n]


def en_lines(corpus: Path, n: int) -> list[str]:
    """n distinct sonnet lines of 25-45 characters."""
    out: list[str] = []
    for line in (corpus / "en" / "sonnets.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if 25 <= len(line) <= 45 and line not in out:
            out.append(line)
    assert len(out) >= n, f"the corpus has only {len(out)} short English lines"
    return out[:n]


def classify_records(corpus: Path, per_class: int, int_labels: bool = False) -> list[dict]:
    """Chinese vs English lines, interleaved: a task any model that reads bytes separates."""
    zh, en = zh_lines(corpus, per_class), en_lines(corpus, per_class)
    labels = (1, 0) if int_labels else ("zh", "en")
    recs = []
    for a, b in zip(zh, en):
        recs += [{"text": a, "label": labels[0]}, {"text": b, "label": labels[1]}]
    return recs


def chat_records(corpus: Path, n: int, offset: int = 0, user: str = "第{i}句？") -> list[dict]:
    """n one-turn conversations: a short question in, a Chinese verse line out (about 30-40 tokens each)."""
    lines = zh_lines(corpus, offset + n)[offset:]
    return [
        {"messages": [{"role": "user", "content": user.format(i=offset + i)}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(lines)
    ]


def shared_run(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per test session by build(folder), whichever test module asks first."""
    root = tmp_path_factory.getbasetemp() / "ft_shared" / name
    if not (root / ".done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build(root)
        (root / ".done").write_text("ok")
    return root


def build_classify_run(corpus: Path, init: Path) -> Callable[[Path], None]:
    """The shared classifier: 40 Chinese + 40 English lines, a quarter held out, 2 epochs at a high LR."""

    def build(root: Path) -> None:
        data = write_jsonl(root / "cls.jsonl", classify_records(corpus, 40))
        args = ["--task=classify", "--val_fraction=0.25", "--epochs=2", "--train.lr=3e-3", "--evals_per_epoch=2"]
        rc, out = run_quiet(*finetune_args(root / "run", init, data, *args))
        (root / "stdout.txt").write_text(out, encoding="utf-8")
        assert rc == 0, out[-2000:]

    return build


def build_chat_run(corpus: Path, init: Path) -> Callable[[Path], None]:
    """The shared chat model: 40 training and 8 validation conversations (a separate file), 2 epochs."""

    def build(root: Path) -> None:
        train = write_jsonl(root / "chat_train.jsonl", chat_records(corpus, 40))
        val = write_jsonl(root / "chat_val.jsonl", chat_records(corpus, 8, offset=40))
        args = ["--task=chat", f"--val_file={val}", "--epochs=2", "--train.lr=3e-3", "--samples=3"]
        rc, out = run_quiet(*finetune_args(root / "run", init, train, *args))
        (root / "stdout.txt").write_text(out, encoding="utf-8")
        assert rc == 0, out[-2000:]

    return build
