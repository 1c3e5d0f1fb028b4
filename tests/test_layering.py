"""The import direction of ARCHITECTURE.md: stages never import each other; the model file imports nothing of
ours; nothing below the stages imports a stage or the CLI; importing the package does no work."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "gptforge"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("gptforge")}


def test_stages_do_not_import_each_other():
    for f in (SRC / "stages").glob("*.py"):
        bad = {n for n in imports_of(f) if n.startswith("gptforge.stages") and n != f"gptforge.stages.{f.stem}"}
        assert not bad, f"{f.name} imports {bad}"


def test_lower_layers_do_not_import_stages_or_cli():
    for sub in ("model", "data", "tokenizer", "train"):
        for f in (SRC / sub).glob("*.py"):
            bad = {n for n in imports_of(f) if n.startswith(("gptforge.stages", "gptforge.cli", "gptforge.demo"))}
            assert not bad, f"{sub}/{f.name} imports {bad}"


def test_model_file_is_self_contained():
    assert imports_of(SRC / "model" / "gpt.py") == set()
    assert len((SRC / "model" / "gpt.py").read_text().splitlines()) <= 500


def test_import_has_no_side_effects():
    code = "import gptforge, gptforge.cli, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the CLI imports torch only when a stage runs
