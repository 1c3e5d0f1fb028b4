"""GPU decode speed: the serving engine with and without CUDA graphs, vs Hugging Face `generate`, same weights.

    python bench/gpu_decode.py                        # needs a CUDA GPU; a 124M Llama-shaped model, bf16, ~2 min
    python bench/gpu_decode.py --smoke --out /tmp/d.json   # a tiny model on this machine: checks the script only

A `LlamaForCausalLM` with random weights (12 layers, width 768, 12 heads, vocab 32000) is saved by transformers and
loaded into gptforge through the normal HF import: the same weights on both sides, bf16. Greedy tokens are compared
before timing (`tokens_match`). Timed, interleaved, medians of `--repeats`:
* `hf_generate`: batch 1, `model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`;
* `engine_eager`: `Engine(model, cuda_graphs=False)`, batch 1 and 8 users at once;
* `engine_cuda_graphs`: `Engine(model)` (graphs on, the default on CUDA), batch 1 and 8 users at once.
Tokens/s = new tokens / wall time of the whole call (prefill included), synchronized. Graph capture happens in the
untimed warm-up call, as it does in a server's first requests. In `--smoke` mode (no GPU) the graphs arm runs the
same fixed-shape steps uncaptured, so the numbers say nothing; only the script is checked.
Writes `bench/results/gpu_decode.json` and the README table, which names the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import machine_facts, publish

from gptforge.engine import Engine, SamplingParams
from gptforge.engine.graphs import GraphDecoder
from gptforge.model.hf_import import load_hf_model
from gptforge.runtime import peak_flops

ROOT = Path(__file__).resolve().parent.parent
FULL = dict(layers=12, width=768, heads=12, mlp=2048, vocab=32000)
SMOKE = dict(layers=2, width=64, heads=4, mlp=128, vocab=512)


def build_pair(shape: dict, block: int, folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["width"], intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=block, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    hf = LlamaForCausalLM.from_pretrained(folder)
    ours, _ = load_hf_model(folder)
    return hf, ours


def engine(model, batch: int, graphs: bool, device: torch.device, max_len: int) -> Engine:
    on_gpu = device.type == "cuda"
    eng = Engine(model, max_batch_size=batch, max_seq_len=max_len, cuda_graphs=graphs and on_gpu)
    if graphs and not on_gpu:  # --smoke: the fixed-shape steps, uncaptured
        eng.graphs = GraphDecoder(model, eng.cache, capture=False)
    return eng


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on any device (checks the script only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_decode.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA GPU here: nothing measured (run on a GPU machine, or --smoke to check the script)")
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMOKE if args.smoke else FULL
    n, plen = (8, 8) if args.smoke else (args.new_tokens, args.prompt_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_pair(shape, plen + n + 8, Path(tmp))
    hf, ours = hf.to(device, dtype).eval(), ours.to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, shape["vocab"], (plen,), generator=g).tolist() for _ in range(8)]
    greedy = SamplingParams(max_tokens=n, temperature=0)
    x = torch.tensor([prompts[0]], device=device)
    kinds = [(k, b) for k in ("eager", "graphs") for b in (1, 8)]
    engines = {f"{k}_b{b}": engine(ours, b, k == "graphs", device, plen + n) for k, b in kinds}

    arms = {
        "hf_generate_b1": lambda: hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[
            0, plen:
        ].tolist(),
        **{f"engine_{k}": (lambda e=e, b=int(k[-1]): e.generate(prompts[:b], greedy)) for k, e in engines.items()},
    }
    with torch.inference_mode():
        first = {k: fn() for k, fn in arms.items()}  # warm-up: graph capture, kernels, allocator
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(args.repeats):
            for k, fn in arms.items():
                times[k].append(timed(fn, device))
    users = {k: (8 if k.endswith("b8") else 1) for k in arms}
    tps = {k: round(users[k] * n / statistics.median(v), 1) for k, v in times.items()}
    _, device_name = peak_flops(device)
    res = {
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "params_m": round(ours.num_params() / 1e6, 1),
        "tokens_per_s": tps,
        "ratio_graphs_vs_eager": {
            b: round(tps[f"engine_graphs_{b}"] / tps[f"engine_eager_{b}"], 2) for b in ("b1", "b8")
        },
        "ratio_graphs_b1_vs_hf": round(tps["engine_graphs_b1"] / tps["hf_generate_b1"], 2),
        "tokens_match": {
            "graphs_vs_eager": first["engine_graphs_b8"] == first["engine_eager_b8"],
            "engine_vs_hf": first["engine_eager_b1"][0] == first["hf_generate_b1"],
        },
        "config": vars(args) | {"out": None, "prompt_tokens": plen, "new_tokens": n},
        "runs_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "smoke": args.smoke,
        "machine": machine_facts(),
    }
    publish(res, table(res), Path(args.out), "gpu_decode", readme=not args.smoke)
    return res


def table(res: dict) -> str:
    t, c = res["tokens_per_s"], res["config"]
    lines = [
        f"Device: **{res['device']}**; {res['params_m']}M-parameter Llama, {res['dtype']}, "
        f"{c['prompt_tokens']}-token prompts, {c['new_tokens']} new tokens, medians of {c['repeats']} runs.",
        "",
        "| users at once | HF generate tok/s | engine eager tok/s | engine CUDA graphs tok/s | graphs / eager |",
        "|---|---:|---:|---:|---:|",
        f"| 1 | {t['hf_generate_b1']:,} | {t['engine_eager_b1']:,} | {t['engine_graphs_b1']:,} | "
        f"**{res['ratio_graphs_vs_eager']['b1']}x** |",
        f"| 8 | | {t['engine_eager_b8']:,} | {t['engine_graphs_b8']:,} | **{res['ratio_graphs_vs_eager']['b8']}x** |",
        "",
        f"Same greedy tokens: {res['tokens_match']}. CUDA-graph engine vs HF generate at batch 1: "
        f"{res['ratio_graphs_b1_vs_hf']}x.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() is not None or not torch.cuda.is_available() else 1)
