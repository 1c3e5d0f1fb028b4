"""GPU training throughput and MFU: gptforge vs a plain Hugging Face `LlamaForCausalLM` loop, same GPU, same shape.

    python bench/gpu_mfu.py                       # needs a CUDA GPU; a GPT-2-124M-class model, ~3 min
    python bench/gpu_mfu.py --smoke --out /tmp/m.json   # a tiny model on whatever device is here: checks the script

Both sides train the same Llama-shaped model (12 layers, width 768, 12 heads, vocab 50304, context 1024, tied
embeddings: 124M parameters) on the same random token batches, bf16 autocast, AdamW, for `--steps` timed steps
after `--warmup` untimed ones (compilation and autotuning happen there), synchronized before the clock stops:
* `gptforge`: our model, fused AdamW with our parameter groups, `torch.compile` of the model (as `--compile` does),
  SDPA attention (flash kernels on the GPU).
* `hf_llama`: `transformers`' `LlamaForCausalLM` with its default (SDPA) attention, fused AdamW, no compile: the loop a
  user writes from the transformers docs.
MFU = training FLOPs per token (6N + 12·L·C·T, `GPT.flops_per_token`, the same for both since the shapes agree) x
tokens/s over the device's dense bf16 peak (`gptforge.runtime.BF16_PEAK_FLOPS`). Repeats alternate the two sides;
medians are reported. Writes `bench/results/gpu_mfu.json` ({"mfu", "tokens_per_s": {...}, "device", ...}) and the
README table, which names the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlib import machine_facts, publish
from peers import build_hf

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runtime import peak_flops
from gptforge.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, intermediate_size=2048)
SMOKE = dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, intermediate_size=128)


class Hyper:  # what peers.build_hf reads
    def __init__(self, shape: dict) -> None:
        self.vocab_size, self.block_size = shape["vocab_size"], shape["block_size"]
        self.n_layer, self.n_head, self.n_embd = shape["n_layer"], shape["n_head"], shape["n_embd"]
        self.n_kv_head = shape["n_head"]
        self.dropout = 0.0


def timed_run(name: str, shape: dict, batch: int, steps: int, warmup: int, device: torch.device, compile_: bool):
    """Tokens per second of `steps` optimizer steps after `warmup` ones."""
    torch.manual_seed(0)
    if name == "gptforge":
        model = GPT(GPTConfig(**shape)).to(device)
        opt = build_optimizer(model, 6e-4, 0.1, (0.9, 0.95), 1e-8, device)
        fwd = torch.compile(model) if compile_ else model

        def loss_of(x, y):
            return fwd(x, y)[1]
    else:
        model = build_hf(Hyper(shape), shape["intermediate_size"]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=device.type == "cuda")

        def loss_of(x, y):
            logits = model(input_ids=x, use_cache=False).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    gen = torch.Generator(device="cpu").manual_seed(1)
    data = torch.randint(0, shape["vocab_size"], (4, batch, shape["block_size"] + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = data[step % 4]
        with autocast:
            loss = loss_of(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = GPT(GPTConfig(**shape)).flops_per_token() if name == "gptforge" else None
    return steps * batch * shape["block_size"] / (time.perf_counter() - t0), flops


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (of block_size tokens)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on any device (checks the script only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_mfu.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA GPU here: nothing measured (run on a GPU machine, or --smoke to check the script)")
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMOKE if args.smoke else GPT2_124M
    batch = 2 if args.smoke else args.batch
    torch.backends.cuda.matmul.allow_tf32 = True
    speeds: dict[str, list[float]] = {"gptforge": [], "hf_llama": []}
    flops = None
    for _ in range(args.repeats):
        for name in speeds:
            tok_s, f = timed_run(name, shape, batch, args.steps, args.warmup, device, not args.no_compile)
            speeds[name].append(tok_s)
            flops = f or flops
            if device.type == "cuda":
                torch.cuda.empty_cache()
    peak, device_name = peak_flops(device)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    mfu = {k: (flops * v / peak if peak else None) for k, v in med.items()}
    res = {
        "device": device_name,
        "model": {**shape, "params": GPT(GPTConfig(**shape)).num_params()},
        "batch_tokens": batch * shape["block_size"],
        "tokens_per_s": med,
        "mfu": mfu["gptforge"],
        "mfu_by_side": mfu,
        "ratio_vs_hf": med["gptforge"] / med["hf_llama"],
        "peak_bf16_flops": peak,
        "flops_per_token": flops,
        "runs": speeds,
        "smoke": args.smoke,
        "machine": machine_facts(),
    }
    publish(res, table(res), Path(args.out), "gpu_mfu", readme=not args.smoke)
    return res


def table(res: dict) -> str:
    def pct(x):
        return "n/a (no known bf16 peak)" if x is None else f"{x:.1%}"

    lines = [
        f"Device: **{res['device']}**; model {res['model']['params'] / 1e6:.0f}M parameters, "
        f"{res['batch_tokens']:,} tokens per step, bf16 autocast, medians of {len(res['runs']['gptforge'])} runs.",
        "",
        "| loop | tokens/s | MFU |",
        "|---|---:|---:|",
    ]
    for k, v in res["tokens_per_s"].items():
        lines.append(f"| {k} | {v:,.0f} | {pct(res['mfu_by_side'][k])} |")
    lines += ["", f"gptforge vs plain Hugging Face loop: {res['ratio_vs_hf']:.2f}x."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() is not None or not torch.cuda.is_available() else 1)
