"""Command line: `gptforge <stage> [--config file.yaml] [--dotted.key=value ...]`.

The dispatch table maps a stage name to its (Config, run). Known user errors (bad config, bad data, bad checkpoint)
print one line naming the problem and exit with status 2; nothing already written is touched.
"""

from __future__ import annotations

import importlib
import os
import sys

from gptforge import __version__

STAGES = {
    "clean": "gptforge.stages.clean",
    "augment": "gptforge.stages.augment",
    "tokenizer": "gptforge.stages.tokenizer",
    "pretrain": "gptforge.stages.pretrain",
    "finetune": "gptforge.stages.finetune",
    "evaluate": "gptforge.stages.evaluate",
    "generate": "gptforge.stages.generate",
    "compress": "gptforge.stages.compress",
    "export": "gptforge.stages.export",
    "serve": "gptforge.stages.serve",
    "chat": "gptforge.stages.chat",
    "report": "gptforge.stages.report",
    "demo": "gptforge.demo",
}

USAGE = f"""gptforge {__version__}: train your own GPT, stage by stage.

usage: gptforge <stage> [--config FILE.yaml] [--key=value | --section.key=value ...]

stages:
  clean       read, normalize, filter, deduplicate and decontaminate messy text; writes a data report
  augment     add label-preserving augmented copies of training texts (synonyms, swaps, noise; zh + en)
  tokenizer   train a byte-level BPE tokenizer on a folder of text
  pretrain    tokenize the text into shards and train a GPT (resumable: --resume)
  finetune    chat SFT, classification or continued pretraining; LoRA, cross-validation, hyperparameter search
  evaluate    perplexity/bits per byte, classification metrics and confusion matrix, chat replies
  generate    sample from a checkpoint: --ckpt DIR --prompt TEXT
  compress    int8/int4 quantization and pruning (magnitude, Wanda, 2:4, structured) with a before/after report
  export      write a Hugging Face folder (--format hf) or a GGUF file for llama.cpp/Ollama (--format gguf)
  serve       OpenAI-compatible HTTP server with continuous batching: --ckpt DIR [--replicas N]
  chat        chat with a checkpoint (or a running server) in the terminal, streaming
  report      one HTML and one Markdown page with every stage of a run: data, tokenizer, losses, metrics, ...
  demo        the whole default pipeline on the bundled sample corpus

Every key of a stage's config can be set from YAML or a flag; `gptforge <stage> --help` lists them.
"""


# Error classes of modules that import torch: (module, class name). Looked up in sys.modules, never imported here.
_TORCH_ERRORS = (("gptforge.train.checkpoint", "CheckpointError"), ("gptforge.train.trainer", "NonFiniteError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the user's input is wrong": one line and status 2 instead of a traceback.

    Importing checkpoint.py or trainer.py to name their errors would import torch, which the data stages
    (NEEDS_TORCH = False: clean, augment, report, ...) never need and may not have installed. An error class can only
    have been raised if its module was imported, so those are taken from sys.modules when loaded and left out
    otherwise. Call this while handling the exception (in the `except` clause itself), not before the stage runs:
    a stage may import them lazily inside run() (chat loads a checkpoint only for --ckpt).
    """
    from gptforge.config import ConfigError
    from gptforge.data.readers import DataError

    loaded = (getattr(sys.modules.get(mod), name, None) for mod, name in _TORCH_ERRORS)
    return ConfigError, DataError, *(e for e in loaded if e is not None), FileNotFoundError, ValueError


def describe_fields(model, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """One line per key: flag, description, default. Section defaults come from the parent (the demo's model
    section is not GPTConfig's defaults)."""
    from gptforge.config import section_defaults

    defaults = section_defaults(model) if defaults is None else defaults
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            lines += describe_fields(ann, defaults.get(name, {}), f"{prefix}{name}.")
        else:
            if name in defaults:
                default = repr(defaults[name])
            else:
                default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"  --{prefix}{name:<28} {field.description or ''} [{default}]")
    return lines


def _wants_help(args: list[str], model) -> bool:
    """-h/--help as a flag, not as the value of the flag before it (`--prompt -h` is a prompt)."""
    from gptforge.config import ConfigError, _field_type

    for i, a in enumerate(args):
        if a not in ("-h", "--help"):
            continue
        prev = args[i - 1] if i else ""
        if not prev.startswith("--") or "=" in prev or prev == "--config":
            return prev != "--config"
        try:
            if _field_type(model, prev[2:].replace("-", "_")) is bool:
                return True  # a bare boolean flag takes no value
        except ConfigError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"gptforge: error: unknown stage '{stage}' (choose from {', '.join(STAGES)})", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here ever needs the hub
    module = importlib.import_module(STAGES[stage])
    if _wants_help(rest, module.Config):
        print(f"usage: gptforge {stage} [--config FILE.yaml] [--key=value ...]\n\n{module.__doc__.strip()}\n")
        print("\n".join(describe_fields(module.Config)))
        return 0
    config_file = None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            print("gptforge: error: --config needs a file path", file=sys.stderr)
            return 2
        config_file, rest = rest[i + 1], rest[:i] + rest[i + 2 :]
    else:
        for i, a in enumerate(rest):
            if a.startswith("--config="):
                config_file, rest = a.split("=", 1)[1], rest[:i] + rest[i + 1 :]
                if not config_file:
                    print("gptforge: error: --config needs a file path", file=sys.stderr)
                    return 2
                break
    from gptforge.config import load

    try:
        cfg = load(module.Config, config_file, rest)
        runtime = None
        if getattr(module, "NEEDS_TORCH", True):  # the data stages never import torch (and start faster)
            from gptforge.runtime import build_runtime  # imports torch: only here

            runtime = build_runtime(
                getattr(cfg, "device", "auto"), getattr(cfg, "dtype", "auto"), getattr(cfg, "threads", 0)
            )
        module.run(cfg, runtime)
    except _user_errors() as e:  # evaluated only when an exception reaches it: sees what the stage imported
        print(f"gptforge {stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptforge {stage}: interrupted", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
