"""`gptforge generate --ckpt DIR --prompt TEXT`: sample text from a checkpoint with a KV cache.

This is the reference sampler (the model file's `generate`); the batched serving engine is a later stage. With
`out_dir` set, the samples go to `samples.jsonl` beside the resolved `config.yaml`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from gptforge.artifacts import save_config, write_json
from gptforge.runtime import Runtime
from gptforge.train.models import load_for_inference


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ckpt: str = Field(..., description="Checkpoint folder, or a pretrain folder (its best, else newest, checkpoint).")
    prompt: list[str] = Field(default_factory=lambda: [""], description="Prompts; repeat --prompt for several.")
    max_new_tokens: int = Field(100, gt=0, description="Tokens to generate per prompt.")
    temperature: float = Field(0.8, ge=0.0, le=10.0, description="0 is greedy decoding.")
    top_k: int = Field(50, ge=0, description="Keep the k most likely tokens; 0 disables.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables.")
    seed: int = Field(1337, description="Sampling seed: same seed, same text.")
    stop_at_eos: bool = Field(True, description="Stop a sample at the end-of-text (or end-of-turn) token.")
    chat: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Wrap each prompt as a chat user turn; auto = when the checkpoint is a chat model.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or mps.")
    dtype: str = Field("float32", description="Inference dtype: float32 or bfloat16 autocast.")
    out_dir: str = Field("", description="Folder for samples.jsonl and config.yaml; empty = print only.")


def generate_text(model, tok, prompt: str, cfg: Config, runtime: Runtime, chat: bool = False) -> dict:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"prompt {prompt!r} is not valid UTF-8 text") from None
    stops = {tok.eos_id}
    if chat:
        from gptforge.tokenizer.chat import chat_prompt_ids, stop_ids

        ids, stops = chat_prompt_ids(tok, [{"role": "user", "content": prompt}]), stop_ids(tok)
    else:
        ids = [tok.bos_id] + tok.encode(prompt)
    room = model.config.block_size - len(ids)
    if room <= 0:
        raise ValueError(f"prompt is {len(ids)} tokens, the model's context is {model.config.block_size}")
    n_new = min(cfg.max_new_tokens, room)
    gen = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    x = torch.tensor([ids], device=runtime.device)
    t0 = time.perf_counter()
    with runtime.autocast():
        y = model.generate(
            x,
            n_new,
            cfg.temperature,
            cfg.top_k or None,
            cfg.top_p,
            generator=gen,
            stop_ids=stops if cfg.stop_at_eos else None,
            vocab_limit=tok.vocab_size,
        )
    dt = time.perf_counter() - t0
    new = y[0, len(ids) :].tolist()
    if cfg.stop_at_eos:
        cut = [i for i, t in enumerate(new) if t in stops]
        new = new[: cut[0]] if cut else new
    return {
        "prompt": prompt,
        "completion": tok.decode(new, skip_special=True),
        "new_tokens": len(new),
        "tokens_per_s": round(len(new) / dt, 1) if dt > 0 else None,
    }


def run(cfg: Config, runtime: Runtime) -> dict:
    model, tok, meta = load_for_inference(cfg.ckpt, runtime.device)
    if meta.get("task") == "classify":
        raise ValueError(f"{meta['checkpoint']} is a classifier; use `gptforge evaluate` for it")
    chat = cfg.chat == "on" or (cfg.chat == "auto" and meta.get("task") == "chat")
    samples = [generate_text(model, tok, p, cfg, runtime, chat) for p in cfg.prompt]
    for s in samples:
        print(f"--- prompt: {s['prompt']!r}  ({s['new_tokens']} tokens, {s['tokens_per_s']} tok/s)")
        print(s["prompt"] + s["completion"])
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        write_json(out / "summary.json", {"checkpoint_step": meta["step"], "samples": len(samples)})
    return {"samples": samples}
