"""Batch-1 decode speed: gptforge's serving engine vs Hugging Face `transformers` `generate`, same weights.

    python bench/decode.py                 # defaults: 2 model sizes, 5 interleaved repeats, ~2 min on 2 cores
    python bench/decode.py --repeats 3 --new-tokens 64 --out /tmp/decode.json    # quick look

Setup, in one process: a `LlamaForCausalLM` with random weights is built by transformers and saved as safetensors,
then loaded into gptforge through the normal HF import (`gptforge.model.hf_import.load_hf_model`): the very same
weights on both sides. Before timing, greedy outputs are compared token for token (`tokens_match`); a mismatch is
reported, not hidden.

Timed, per model size, with the same prompt (`--prompt-tokens` random ids) and the same number of new tokens
(`--new-tokens`; end-of-sequence disabled on both sides so both produce exactly that many):
* `hf_generate`: `model.generate(input_ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)` with its default
  KV cache.
* `gptforge_engine`: `Engine(model, max_batch_size=1).generate([prompt], SamplingParams(max_tokens=N,
  temperature=0))`: the continuous-batching engine the server runs, with one request.
* `gptforge_reference`: the model file's own `GPT.generate` (KV cache, no scheduler), for context.
Tokens per second = N / wall time of the whole call (prefill included, as a user waits for it). Repeats are
interleaved (A B C, A B C, ...) so slow drift of a shared machine hits every arm alike; medians are reported, and
`ratio_vs_hf_generate` is the median engine tokens/s over the median HF tokens/s for the headline size.
fp32, `torch.set_num_threads(--threads)`, `torch.inference_mode()` for all. The foreign CPU load seen during the
run is recorded (`foreign_cpu_share`): on a shared host, compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import cpu_snapshot, fmt_share, foreign_share, machine_facts, publish

from gptforge.engine import Engine, SamplingParams
from gptforge.model.hf_import import load_hf_model

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # name: (layers, width, heads, kv heads, mlp width, vocab)
    "demo-5M": (4, 256, 4, 4, 688, 8192),
    "llama-40M": (8, 512, 8, 4, 1408, 16384),
}
HEADLINE = "llama-40M"


def build_pair(size: str, workdir: Path, block_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, width, heads, kv, mlp, vocab = SIZES[size]
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=block_size,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    folder = workdir / size
    hf.save_pretrained(folder, safe_serialization=True)
    ours, _ = load_hf_model(folder)
    return hf, ours


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(size: str, args, workdir: Path, dtype: torch.dtype = torch.float32) -> dict:
    hf, ours = build_pair(size, workdir, args.prompt_tokens + args.new_tokens + 8)
    hf, ours = hf.to(dtype), ours.to(dtype)
    vocab = SIZES[size][5]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist()
    n = args.new_tokens
    x = torch.tensor([prompt])
    engine = Engine(ours, max_batch_size=1)
    greedy = SamplingParams(max_tokens=n, temperature=0)

    def run_hf():
        return hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt) :]

    def run_engine():
        return engine.generate([prompt], greedy)[0]

    def run_reference():
        return ours.generate(x, n, temperature=0)[0, len(prompt) :]

    # Serving many users: 8 different prompts at once through one engine vs HF generate one after another.
    many = [torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(8)]
    engine8 = Engine(ours, max_batch_size=8)

    def run_engine8():
        return engine8.generate(many, greedy)

    def run_hf8():
        for p in many:
            hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        a, b, c = run_hf().tolist(), run_engine(), run_reference().tolist()  # also the warm-up
        run_engine8()
        times = {"hf_generate": [], "gptforge_engine": [], "gptforge_reference": []}
        for _ in range(args.repeats):
            times["hf_generate"].append(time_call(run_hf))
            times["gptforge_engine"].append(time_call(run_engine))
            times["gptforge_reference"].append(time_call(run_reference))
        many_times = {"hf_generate_sequential_x8": [], "gptforge_engine_batch8": []}
        for _ in range(max(1, args.repeats // 2)):
            many_times["hf_generate_sequential_x8"].append(time_call(run_hf8))
            many_times["gptforge_engine_batch8"].append(time_call(run_engine8))
    tps = {k: round(n / statistics.median(v), 1) for k, v in times.items()}
    tps8 = {k: round(8 * n / statistics.median(v), 1) for k, v in many_times.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_s_8_users": tps8,
        "ratio_8_users_engine_vs_hf": round(tps8["gptforge_engine_batch8"] / tps8["hf_generate_sequential_x8"], 2),
        "params_m": round(ours.num_params() / 1e6, 1),
        "tokens_per_s": tps,
        "ratio_engine_vs_hf": round(tps["gptforge_engine"] / tps["hf_generate"], 2),
        "ratio_reference_vs_hf": round(tps["gptforge_reference"] / tps["hf_generate"], 2),
        "tokens_match": {"engine_vs_hf": a == b, "reference_vs_hf": a == c},
        "runs_s": {k: [round(t, 4) for t in v] for k, v in (times | many_times).items()},
    }


def table(res: dict) -> str:
    lines = [
        "| model | dtype | HF generate tok/s | gptforge engine tok/s | engine / HF | reference tok/s | same tokens "
        "| 8 users: HF one by one | 8 users: engine | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res["sizes"].items():
        t, t8 = r["tokens_per_s"], r["tokens_per_s_8_users"]
        same = "yes" if all(r["tokens_match"].values()) else f"no {r['tokens_match']}"
        lines.append(
            f"| {key.split(':')[0]} ({r['params_m']}M) | {r['dtype']} | {t['hf_generate']} | {t['gptforge_engine']} | "
            f"**{r['ratio_engine_vs_hf']}x** | {t['gptforge_reference']} | {same} | "
            f"{t8['hf_generate_sequential_x8']} | {t8['gptforge_engine_batch8']} | {r['ratio_8_users_engine_vs_hf']}x |"
        )
    m = res["machine"]
    lines.append("")
    lines.append(
        f"Batch 1 (and 8 users at once), fp32 unless the dtype column says otherwise, "
        f"{res['config']['prompt_tokens']}-token prompt, {res['config']['new_tokens']} new tokens, "
        f"median of {res['config']['repeats']} interleaved runs, {res['config']['threads']} threads on "
        f"{m.get('cpu', 'cpu')}; foreign CPU load during the run: {fmt_share(res['foreign_cpu_share'])}. "
        f"`ratio_vs_hf_generate` ({HEADLINE}) = **{res['ratio_vs_hf_generate']}x**."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the headline size in bfloat16 (both sides)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode.json"))
    ap.add_argument("--no-readme", action="store_true", help="do not update the README table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    snap0 = cpu_snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {s: bench_size(s, args, Path(tmp)) for s in args.sizes}
        if args.bf16 and HEADLINE in args.sizes:
            sizes[f"{HEADLINE}:bf16"] = bench_size(HEADLINE, args, Path(tmp), torch.bfloat16)
    head = sizes.get(HEADLINE) or next(iter(sizes.values()))
    res = {
        "benchmark": "decode",
        "ratio_vs_hf_generate": head["ratio_engine_vs_hf"],
        "headline_size": HEADLINE if HEADLINE in sizes else next(iter(sizes)),
        "sizes": sizes,
        "config": vars(args) | {"out": None},
        "foreign_cpu_share": foreign_share(snap0, cpu_snapshot()),
        "machine": machine_facts(),
    }
    publish(res, table(res), Path(args.out), "decode", readme=not args.no_readme)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
