"""`gptforge export --ckpt DIR --format hf|gguf`: hand a trained model to other tools.

- `--format hf` writes a Hugging Face folder (config.json, model.safetensors, tokenizer files with the chat template,
  generation_config.json, README.md) that `transformers.AutoModelForCausalLM.from_pretrained` loads with no custom
  code, as a stock Llama, Qwen2 or GPT-2 model; `--dtype` picks float32, bfloat16 or float16 weights.
- `--format gguf` writes one GGUF file for llama.cpp / Ollama / llama-cpp-python; `--gguf_type` picks f32, f16 or
  q8_0 (pip install gptforge[export]).

A LoRA checkpoint is exported with its adapters merged; a quantized checkpoint (`gptforge compress`) is turned back
into float weights first, since neither format can hold gptforge's int8/int4 layouts. Classifiers are refused: both
formats describe language models, and a classification head would be silently dropped. A model whose config no stock
architecture computes exactly is refused naming the field (see gptforge.export.hf).

Writes the export to `--out` (default `<run_dir>/export/hf` or `<run_dir>/export/gguf/model-<type>.gguf`), and in
`<run_dir>/export/` a record `<output name>.export.json` (what was written, from which checkpoint, how to load it)
and the resolved config.yaml.
An existing export is replaced only with --overwrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gptforge.artifacts import append_ledger, save_config, write_json

# cli: no Runtime to build. Export always works on CPU in float32 (it only copies tensors), and `dtype` here is the
# dtype of the written weights, which may be float16 - not a compute dtype build_runtime would accept.
NEEDS_TORCH = False


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ckpt: str = Field(..., description="Checkpoint folder, or a stage folder holding checkpoints (best, else newest).")
    format: Literal["hf", "gguf"] = Field("hf", description="hf = Hugging Face folder; gguf = llama.cpp file.")
    out: str = Field(
        "", description="Output folder (hf) or .gguf file; empty = <run_dir>/export/hf or .../gguf/model-<type>.gguf."
    )
    gguf_type: Literal["f32", "f16", "q8_0"] = Field("f16", description="gguf only: type of the 2-D weights.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="hf only: dtype of the weights.")
    run_dir: str = Field("runs/default", description="Run directory; the default output goes under <run_dir>/export/.")
    overwrite: bool = Field(False, description="Replace an existing export at --out.")
    allow_nonfinite: bool = Field(False, description="Export even if a tensor holds NaN/inf (for debugging only).")


def default_out(cfg: Config) -> Path:
    base = Path(cfg.run_dir) / "export"
    return base / "hf" if cfg.format == "hf" else base / "gguf" / f"model-{cfg.gguf_type}.gguf"


def load_command(fmt: str, out: Path) -> str:
    """A one-line command that loads the export, printed for the user and kept in export.json."""
    if fmt == "hf":
        return (
            'python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; '
            f"m = AutoModelForCausalLM.from_pretrained('{out}'); t = AutoTokenizer.from_pretrained('{out}')\""
        )
    return f"llama-cli -m {out}   # or: python -c \"from llama_cpp import Llama; Llama(model_path='{out}')\""


def run(cfg: Config, runtime: Any = None) -> dict[str, Any]:
    import torch

    from gptforge.train.models import load_for_inference

    model, tok, meta = load_for_inference(cfg.ckpt, "cpu", allow_nonfinite=cfg.allow_nonfinite)
    if meta.get("task") == "classify":
        raise ValueError(
            f"checkpoint {meta['checkpoint']} is a classifier (task=classify): export writes language models "
            "(Hugging Face CausalLM, GGUF) and would drop the classification head; export a pretrain, lm or chat "
            "checkpoint, or use `gptforge serve`/`evaluate` for the classifier"
        )
    if (meta.get("compression") or {}).get("quantization"):
        from gptforge.compress.quantize import dequantize_model

        model = dequantize_model(model)  # neither format holds gptforge's int layouts: export the float weights
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    source = Path(meta["checkpoint"])
    # general.name in GGUF, provenance in both: the checkpoint's stage folder (pretrain, chat, ...) and its step.
    info = {**meta, "name": f"{source.parent.parent.name or 'gptforge'}-step{meta.get('step', 0)}"}
    if cfg.format == "hf":
        from gptforge.export.hf import export_hf

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        summary = export_hf(
            model, tok, out, meta=info, dtype=dtype, overwrite=cfg.overwrite, allow_nonfinite=cfg.allow_nonfinite
        )
        size = sum(f.stat().st_size for f in out.iterdir())
    else:
        from gptforge.export.gguf import export_gguf

        summary = export_gguf(
            model, tok, out, cfg.gguf_type, meta=info, allow_nonfinite=cfg.allow_nonfinite, overwrite=cfg.overwrite
        )
        size = summary["bytes"]
    result = {
        **summary,
        "checkpoint": meta["checkpoint"],
        "step": meta.get("step"),
        "task": meta.get("task", "lm"),
        "dequantized": bool((meta.get("compression") or {}).get("quantization")),
        "size_bytes": size,
        "load": load_command(cfg.format, out),
    }
    # The record goes to this stage's own folder, never beside a user-chosen --out (it would overwrite their files),
    # named after the output so exports of several formats and types keep separate records.
    record_dir = Path(cfg.run_dir) / "export"
    write_json(record_dir / f"{out.name}.export.json", result)
    save_config(cfg, record_dir)
    append_ledger(cfg.run_dir, f"export/{cfg.format}", "ok", {"num_params": summary["num_params"], "bytes": size})
    arch = summary.get("architecture")
    print(f"exported {meta['checkpoint']} as {cfg.format} ({arch}, {size / 1e6:.2f} MB) -> {out}")
    print(f"load it with:\n  {result['load']}")
    return result
