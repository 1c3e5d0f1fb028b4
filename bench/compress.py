"""Compression: fp32 vs int8 vs int4 vs pruned variants of the same trained model, side by side in one process.

    python bench/compress.py                      # the demo's model (runs/demo/pretrain; `make demo` first), ~4 min
    python bench/compress.py --ckpt runs/mine/pretrain --repeats 3

Variants are made by the real `gptforge compress` stage (into a temporary run folder, report skipped) and loaded
back from their checkpoints with `load_for_inference`, exactly as `generate`/`serve` load them:
* `int8`: int8 weight-only (per-row scales, `torch._weight_int8pack_mm`), every linear layer and the tied embedding.
* `int8_dynamic`: the same int8 weights, activations quantized per row at run time (fbgemm `linear_dynamic`).
* `int4`: group-wise (64) asymmetric int4 weight-only (`torch._weight_int4pack_mm_for_cpu`).
* `pruned`: structured pruning to half the attention heads (whole GQA groups) and half the MLP channels, a genuinely
  smaller dense model, then 100 steps of recovery fine-tuning on training windows.
* `wanda50`, `sparse24`: unstructured Wanda 50% and 2:4 semi-structured (same size on disk: zeros are stored dense,
  and CPU kernels gain nothing from them; shown for the quality cost only).

Measured per variant: size of `model.safetensors` on disk (ratio to fp32), perplexity on the run's held-out
validation windows (change in percent), and batch-1 greedy decode tokens/s through the serving engine (ratio to
fp32). Decode runs are interleaved (fp32, int8, ..., fp32, int8, ...) and the median is reported, so drift of a
shared machine hits every variant alike.

Decode speed of a 5M-parameter model is mostly Python and kernel-launch overhead, not weight traffic, so a second
table repeats the decode measurement on a 40M-parameter model of the same architecture (random weights: speed does
not depend on the values; no perplexity there). That is where a memory-bound decode step shows what smaller weights
buy. fp32 everywhere, `torch.set_num_threads(--threads)`, `torch.inference_mode()`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from benchlib import cpu_snapshot, fmt_share, foreign_share, machine_facts, publish

from gptforge.cli import main as cli
from gptforge.compress.quantize import quantize_model
from gptforge.compress.report import decode_speeds, lm_quality
from gptforge.data.shards import TokenWindows
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runtime import Runtime
from gptforge.train.models import load_for_inference

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: gptforge compress flags
    "int8": ["--quantize=int8"],
    "int8_dynamic": ["--quantize=int8_dynamic"],
    "int4": ["--quantize=int4", "--group_size=64"],
    "pruned": ["--prune=structured", "--heads_keep=0.5", "--mlp_keep=0.5", "--recover_steps=100",
               "--recover_lr=3e-4", "--quantize=none"],
    "wanda50": ["--prune=wanda", "--sparsity=0.5", "--quantize=none"],
    "sparse24": ["--prune=2:4", "--quantize=none"],
}  # fmt: skip
SCALE = GPTConfig(
    vocab_size=16384,
    block_size=256,
    n_layer=8,
    n_head=8,
    n_kv_head=4,
    n_embd=512,
    intermediate_size=1408,
    tie_embeddings=False,
)  # fmt: skip  (bench/decode.py's llama-40M)
GOALS = {"int8": {"size_ratio": 0.27, "ppl_delta_pct": 1.0, "decode_speedup": 1.5}, "int4": {"size_ratio": 0.16,
         "ppl_delta_pct": 5.0}}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=str(ROOT / "runs" / "demo" / "pretrain"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--scale", action=argparse.BooleanOptionalAction, default=True, help="also the 40M decode table")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compress.json"))
    ap.add_argument("--no-readme", action="store_true", help="do not update the README table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    snap0 = cpu_snapshot()
    base, tok, meta = load_for_inference(args.ckpt)
    run_dir = Path(meta["config"]["run_dir"])
    tokens = run_dir / "pretrain" / "tokens"
    if not (tokens / "meta.json").is_file():
        sys.exit(f"{tokens} not found: the benchmark needs the checkpoint's pretraining run (`make demo` first)")
    val = TokenWindows(tokens, "val", base.config.block_size)
    win = np.stack([val.window(i) for i in range(min(args.eval_windows, len(val)))])
    rows, bpt = (win[:, :-1], win[:, 1:]), val.bytes / max(1, val.tokens)
    runtime = Runtime(torch.device("cpu"), torch.float32)

    models = {"fp32": base}
    sizes = {"fp32": (Path(meta["checkpoint"]) / "model.safetensors").stat().st_size}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in VARIANTS.items():
            common = [f"--ckpt={args.ckpt}", f"--run_dir={tmp}", f"--name={name}", "--decode_tokens=0"]
            # The stage's own report and progress bar: this table replaces them.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = cli(["compress", *common, "--eval_windows=1", *flags])
            if rc != 0:
                sys.exit(f"gptforge compress {' '.join(flags)} failed ({rc})")
            folder = Path(tmp) / "compress" / name
            models[name], _, m = load_for_inference(folder)
            sizes[name] = (Path(m["checkpoint"]) / "model.safetensors").stat().st_size
        with torch.inference_mode():
            quality = {k: lm_quality(m, rows, bpt, runtime) for k, m in models.items()}
            speed = decode_speeds(models, tok.vocab_size, args.new_tokens, repeats=args.repeats)
    res: dict = {"model": args.ckpt, "params": base.num_params(), "eval_tokens": int(rows[1].size)}
    for k in models:
        res[k] = {
            "size_ratio": sizes[k] / sizes["fp32"],
            "ppl": quality[k]["ppl"],
            "ppl_delta_pct": 100 * (quality[k]["ppl"] / quality["fp32"]["ppl"] - 1),
            "bpb": quality[k]["bpb"],
            "decode_tok_s": speed[k],
            "decode_speedup": speed[k] / speed["fp32"],
        }
    if args.scale:
        big = GPT(SCALE).eval()
        scaled = {"fp32": big}
        for scheme in ("int8", "int8_dynamic", "int4"):
            scaled[scheme] = copy.deepcopy(big)
            quantize_model(scaled[scheme], scheme, group_size=64)
        with torch.inference_mode():
            sp = decode_speeds(scaled, SCALE.vocab_size, args.new_tokens, repeats=args.repeats)
        res["scale_40M"] = {"params": big.num_params(), **{k: {"decode_tok_s": v, "decode_speedup": v / sp["fp32"]}
                                                          for k, v in sp.items()}}  # fmt: skip
    res["goals"] = {
        f"{v}.{k}": (res[v][k] <= lim if k != "decode_speedup" else res[v][k] >= lim)
        for v, g in GOALS.items()
        for k, lim in g.items()
    }
    res["foreign_cpu_share"] = foreign_share(snap0, cpu_snapshot())
    res["threads"] = args.threads
    res["machine"] = machine_facts()
    publish(res, table(res), Path(args.out), "compress", readme=not args.no_readme)
    return res


def table(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"Trained model: `{Path(res['model']).as_posix()}` ({res['params'] / 1e6:.1f}M parameters), perplexity on "
        f"{res['eval_tokens']:,} held-out tokens, batch-1 greedy decode through the serving engine.",
        "",
        "| variant | size vs fp32 | perplexity | ppl change | decode tokens/s | decode vs fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in ("fp32", *VARIANTS):
        r = res[k]
        lines.append(
            f"| {k} | {r['size_ratio']:.3f}x | {r['ppl']:.2f} | {r['ppl_delta_pct']:+.2f}% | "
            f"{r['decode_tok_s']:.0f} | {r['decode_speedup']:.2f}x |"
        )
    if "scale_40M" in res:
        s = res["scale_40M"]
        lines += ["", f"Decode at 40M parameters (same architecture, {s['params'] / 1e6:.0f}M, random weights):", ""]
        lines += ["| variant | decode tokens/s | vs fp32 |", "|---|---:|---:|"]
        rows = [(k, v) for k, v in s.items() if k != "params"]
        lines += [f"| {k} | {v['decode_tok_s']:.1f} | {v['decode_speedup']:.2f}x |" for k, v in rows]
    met = ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in res["goals"].items())
    lines += ["", f"Goals: {met}.", ""]
    lines.append(
        f"Medians of {res.get('threads')}-thread runs; {m.get('cpu', 'cpu')}; foreign CPU load during the run: "
        f"{fmt_share(res['foreign_cpu_share'])}. `python bench/compress.py` regenerates this table."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
