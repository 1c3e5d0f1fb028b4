"""GPU decode speed: the serving engine with and without CUDA graphs, vs Hugging Face `generate`, same weights.

    python bench/gpu_decode.py                        # needs a CUDA GPU; a 124M Llama-shaped model, bf16, ~2 min
    python bench/gpu_decode.py --smoke --out /tmp/d.json   # a tiny model on this machine: checks the script only

A `LlamaForCausalLM` with random weights (12 layers, width 768, 12 heads, vocab 32000) is saved by transformers and
loaded into gptforge through the normal HF import: the same weights on both sides.

Greedy tokens are compared first (`tokens_match`, and `tokens_agree_prefix`: how many leading tokens agree, the
minimum over users), in **float32 with TF32 off** (cuBLAS and cuDNN; restored afterwards): with random weights the
top two logits are often close, and bf16 rounding alone would flip an argmax somewhere in 256 tokens, so a bf16
check would report a mismatch that says nothing about the engine. Timings are then taken in bf16, on the same
weights cast down. Timed, interleaved, medians of `--repeats`:
* `hf_generate`: batch 1, `model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`;
* `engine_eager`: `Engine(model, cuda_graphs=False)`, batch 1 and 8 users at once;
* `engine_cuda_graphs`: `Engine(model)` (graphs on, the default on CUDA), batch 1 and 8 users at once.
Tokens/s = new tokens / wall time of the whole call (prefill included), synchronized. Graph capture happens in the
untimed warm-up call, as it does in a server's first requests; `graphs` records the buckets captured and any capture
error (a failed capture falls back to eager steps, and the graphs column would then time those).

`sdpa` records which attention backend the decode steps can use and do use, in the timing dtype: the enabled flags
and priority order, `torch.backends.cuda.can_use_{flash,efficient,cudnn}_attention` for the decode shapes (one query
per row, a boolean mask, keys a strided view of the cache), and the `aten::_scaled_dot_product_*` ops a profiled
decode-only step really dispatched to, for the eager and the fixed-shape (graph) steps.

In `--smoke` mode (no GPU) the graphs arm runs the same fixed-shape steps uncaptured, so the numbers say nothing;
only the script is checked. Writes `bench/results/gpu_decode.json` and the README table, which names the device.
"""

from __future__ import annotations

import argparse
import contextlib
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
GRAPH_ARMS = ("graphs_b1", "graphs_b8")


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


@contextlib.contextmanager
def exact_fp32():
    """float32 matmuls and convolutions in full precision (no TF32), restoring the caller's settings."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def agree_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tokens(hf, ours, prompts: list[list[int]], n: int, device: torch.device, max_len: int) -> dict:
    """Greedy tokens of HF generate, the eager engine and the graphs engine, on the models as given (float32)."""
    greedy = SamplingParams(max_tokens=n, temperature=0)
    plen = len(prompts[0])
    x = torch.tensor([prompts[0]], device=device)
    hf_b1 = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[0, plen:].tolist()
    eager_b1 = engine(ours, 1, False, device, max_len).generate(prompts[:1], greedy)[0]
    eager_b8 = engine(ours, 8, False, device, max_len).generate(prompts, greedy)
    graphs_eng = engine(ours, 8, True, device, max_len)
    graphs_b8 = graphs_eng.generate(prompts, greedy)
    pairs = {"graphs_vs_eager": (graphs_b8, eager_b8), "engine_vs_hf": ([eager_b1], [hf_b1])}
    return {
        "tokens_match": {k: a == b for k, (a, b) in pairs.items()},
        "tokens_agree_prefix": {k: min(agree_prefix(r, s) for r, s in zip(a, b)) for k, (a, b) in pairs.items()},
        "check_graphs": graph_state(graphs_eng),
    }


def graph_state(eng: Engine) -> dict:
    g = eng.graphs
    return {"captured": [list(b) for b in g.captured], "capture": g.capture, "capture_error": g.capture_error}


def sdpa_facts(model, device: torch.device, dtype: torch.dtype, max_len: int, lengths: list[int]) -> dict:
    """Which SDPA backends are enabled, in which order, and which can take the engine's decode attention calls."""
    from torch.backends.cuda import SDPAParams
    from torch.nn.attention import SDPBackend

    cfg = model.config
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    checks = {
        "flash": torch.backends.cuda.can_use_flash_attention,
        "efficient": torch.backends.cuda.can_use_efficient_attention,
        "cudnn": torch.backends.cuda.can_use_cudnn_attention,
    }
    names = {int(getattr(SDPBackend, m)): m for m in SDPBackend.__members__}
    can_use = {}
    for B in (1, 8):
        for S in lengths:
            q = torch.zeros(B, 1, H, D, device=device, dtype=dtype).transpose(1, 2)  # (B, H, 1, D), as the model
            kv = torch.zeros(B, K, max_len, D, device=device, dtype=dtype)[:, :, :S]  # a view of the cache
            mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
            params = SDPAParams(q, kv, kv, mask, 0.0, False, K != H)
            # debug=True once per backend (largest shape): torch logs why a backend is refused.
            debug = B == 8 and S == lengths[-1]
            can_use[f"b{B}_s{S}"] = {k: bool(fn(params, debug)) for k, fn in checks.items()}
    return {
        "enabled": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
        "priority": [names.get(i, str(i)) for i in torch._C._get_sdp_priority_order()],
        "flash_attention_available": torch.backends.cuda.is_flash_attention_available(),
        "cudnn_version": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "decode_can_use": can_use,
    }


def attention_ops(eng: Engine, prompts: list[list[int]]) -> dict[str, int]:
    """The backend-specific SDPA ops (`aten::_scaled_dot_product_*`) one decode-only step dispatched to."""
    from torch.profiler import ProfilerActivity, profile

    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=4, temperature=0))
    eng.step()  # prefill (and the first decode, in the same step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.step()  # decode only
    while eng.has_unfinished():
        eng.step()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


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
    max_len = plen + n
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_pair(shape, max_len + 8, Path(tmp))
    hf, ours = hf.to(device, torch.float32).eval(), ours.to(device, torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, shape["vocab"], (plen,), generator=g).tolist() for _ in range(8)]
    with torch.inference_mode(), exact_fp32():
        check = check_tokens(hf, ours, prompts, n, device, max_len)
    hf, ours = hf.to(dtype), ours.to(dtype)  # in place: the timed models are the checked ones, cast down

    greedy = SamplingParams(max_tokens=n, temperature=0)
    x = torch.tensor([prompts[0]], device=device)
    kinds = [(k, b) for k in ("eager", "graphs") for b in (1, 8)]
    engines = {f"{k}_b{b}": engine(ours, b, k == "graphs", device, max_len) for k, b in kinds}
    arms = {
        "hf_generate_b1": lambda: hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0),
        **{f"engine_{k}": (lambda e=e, b=int(k[-1]): e.generate(prompts[:b], greedy)) for k, e in engines.items()},
    }
    with torch.inference_mode():
        for fn in arms.values():  # warm-up: graph capture, kernels, allocator
            fn()
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(args.repeats):
            for k, fn in arms.items():
                times[k].append(timed(fn, device))
        lengths = sorted({plen + 1, *engines["graphs_b8"].graphs.length_buckets})
        sdpa = sdpa_facts(ours, device, dtype, max_len, lengths) | {
            "decode_ops": {
                "eager": attention_ops(engine(ours, 8, False, device, max_len), prompts),
                "fixed_shape": attention_ops(engine_fixed_shape(ours, device, max_len), prompts),
            }
        }
    users = {k: (8 if k.endswith("b8") else 1) for k in arms}
    tps = {k: round(users[k] * n / statistics.median(v), 1) for k, v in times.items()}
    _, device_name = peak_flops(device)
    res_dtype = str(dtype).removeprefix("torch.")
    res = {
        "device": device_name,
        "dtype": res_dtype,
        "params_m": round(ours.num_params() / 1e6, 1),
        "tokens_per_s": tps,
        "ratio_graphs_vs_eager": {
            b: round(tps[f"engine_graphs_{b}"] / tps[f"engine_eager_{b}"], 2) for b in ("b1", "b8")
        },
        "ratio_graphs_b1_vs_hf": round(tps["engine_graphs_b1"] / tps["hf_generate_b1"], 2),
        "tokens_match": check["tokens_match"],
        "tokens_agree_prefix": check["tokens_agree_prefix"],
        "tokens_check": f"float32 weights and KV cache, TF32 off (timings in {res_dtype})",
        "graphs": {"check_b8": check["check_graphs"]} | {k: graph_state(engines[k]) for k in GRAPH_ARMS},
        "sdpa": sdpa,
        "config": vars(args) | {"out": None, "prompt_tokens": plen, "new_tokens": n},
        "runs_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "smoke": args.smoke,
        "machine": machine_facts(),
    }
    publish(res, table(res), Path(args.out), "gpu_decode", readme=not args.smoke)
    return res


def engine_fixed_shape(model, device: torch.device, max_len: int) -> Engine:
    """The graphs arm's fixed-shape steps, uncaptured: what each captured graph runs (the profiler cannot see into
    a replay)."""
    eng = Engine(model, max_batch_size=8, max_seq_len=max_len, cuda_graphs=False)
    eng.graphs = GraphDecoder(model, eng.cache, capture=False)
    return eng


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
        f"Same greedy tokens, checked in {res['tokens_check']}: {res['tokens_match']}. "
        f"CUDA-graph engine vs HF generate at batch 1: {res['ratio_graphs_b1_vs_hf']}x.",
        "",
        f"Decode attention ops: eager {fmt_ops(res['sdpa']['decode_ops']['eager'])}, "
        f"fixed-shape (graphs) {fmt_ops(res['sdpa']['decode_ops']['fixed_shape'])}; "
        f"cuDNN SDPA enabled: {res['sdpa']['enabled']['cudnn']}.",
    ]
    errors = {k: v["capture_error"] for k, v in res["graphs"].items() if v["capture_error"]}
    if errors:
        lines += ["", f"**CUDA graph capture failed** (those arms ran the fixed-shape steps eagerly): {errors}"]
    return "\n".join(lines)


def fmt_ops(ops: dict[str, int]) -> str:
    return ", ".join(f"`{k.removeprefix('aten::')}`" for k in ops) or "none seen"


if __name__ == "__main__":
    sys.exit(0 if main() is not None or not torch.cuda.is_available() else 1)
