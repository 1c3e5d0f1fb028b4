"""`gptforge demo`: the default pipeline on the bundled sample corpus, in a few minutes on a 2-core CPU.

clean (the sample includes messy copies: GBK, Big5, ANSI codes, HTML, duplicates, boilerplate) -> tokenizer ->
pretrain (a ~5M-parameter model) -> generate samples from Chinese and English prompts -> fine-tune a classifier
(which collection a poem or passage comes from) and a chat model (title and author in, poem out) -> evaluate both on
test splits they never saw, printing the metrics table and chat replies -> compress the pretrained model to int8 with
a before/after report -> export the chat model as a Hugging Face folder. It orchestrates
the stages the way a user would call them one by one; each stage still writes only its own folder of the run
directory. The same settings are in `configs/demo/default.yaml`.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gptforge import SAMPLE, sample_data_dir
from gptforge.artifacts import save_config, stage_dir
from gptforge.model.gpt import GPTConfig
from gptforge.runtime import Runtime
from gptforge.stages import clean, compress, evaluate, export, finetune, generate, pretrain, tokenizer
from gptforge.train.trainer import TrainConfig

DEMO_MODEL = GPTConfig(block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, dropout=0.1)
DEMO_TRAIN = TrainConfig(
    max_steps=500,
    micro_batch_size=16,
    grad_accum=1,
    lr=2e-3,
    warmup_steps=50,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    eval_every=50,
    eval_batches=0,
    save_every=100,
    keep_last=2,
    early_stop_patience=4,
    log_every=10,
)
DEMO_PROMPTS = ["《春晓》\n作者：", "《静夜思》\n作者：李白\n", "ROMEO.\n", "To be, or not to be"]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/demo", description="Run directory for every stage of the demo.")
    input: str = Field(SAMPLE, description="Folder of text; @sample is the bundled corpus.")
    vocab_size: int = Field(8192, ge=300, description="Tokenizer vocabulary size.")
    device: str = Field("auto", description="auto, cpu, cuda or mps.")
    dtype: str = Field("auto", description="Autocast dtype for training: auto, bfloat16 or float32.")
    threads: int = Field(0, ge=0, description="CPU threads; 0 keeps torch's default.")
    model: GPTConfig = Field(default_factory=lambda: DEMO_MODEL.model_copy())
    train: TrainConfig = Field(default_factory=lambda: DEMO_TRAIN.model_copy())
    prompts: list[str] = Field(default_factory=lambda: list(DEMO_PROMPTS), description="Generation prompts.")
    max_new_tokens: int = Field(80, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(40, ge=0)
    resume: bool = Field(False, description="Resume pretraining from this run's newest checkpoint (else start over).")
    finetune: bool = Field(True, description="Fine-tune and evaluate the classifier and chat tasks after pretraining.")
    classify_epochs: float = Field(4.0, gt=0, description="Epochs of the collection classifier.")
    chat_epochs: float = Field(8.0, gt=0, description="Epochs of chat fine-tuning.")
    finetune_lr: float = Field(1e-3, gt=0, description="Peak learning rate of both fine-tuning runs.")


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def run(cfg: Config, runtime: Runtime) -> dict:
    t0 = time.perf_counter()
    save_config(cfg, stage_dir(cfg.run_dir, "demo"))
    banner("1/9 clean: decode, normalize, filter and deduplicate the raw text")
    clean_stats = clean.run(clean.Config(run_dir=cfg.run_dir, input=[cfg.input], overwrite=not cfg.resume), None)
    text = str(Path(cfg.run_dir) / "clean" / "data")
    banner("2/9 tokenizer: byte-level BPE trained on the cleaned corpus")
    tok_cfg = tokenizer.Config(run_dir=cfg.run_dir, input=text, vocab_size=cfg.vocab_size, overwrite=not cfg.resume)
    tok_stats = tokenizer.run(tok_cfg, runtime)
    banner("3/9 pretrain: a small GPT (RoPE, RMSNorm, SwiGLU, GQA)")
    pre_cfg = pretrain.Config(
        run_dir=cfg.run_dir,
        input=text,
        model=cfg.model,
        train=cfg.train,
        device=cfg.device,
        dtype=cfg.dtype,
        threads=cfg.threads,
        resume=cfg.resume,
        overwrite=not cfg.resume,  # running the demo again starts it over
    )
    summary = pretrain.run(pre_cfg, runtime)
    banner("4/9 generate: samples from the best checkpoint (KV cache)")
    gen_cfg = generate.Config(
        ckpt=str(Path(cfg.run_dir) / "pretrain" / "checkpoints"),
        prompt=cfg.prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        device=cfg.device,
        out_dir=str(Path(cfg.run_dir) / "generate"),
    )
    samples = generate.run(gen_cfg, runtime)
    tuned = _finetune(cfg, runtime) if cfg.finetune else {}
    shrunk, exported = _compress_and_export(cfg, runtime, bool(tuned))
    val = summary["val"]
    banner("demo finished")
    r = clean_stats["records"]
    print(
        f"clean          {r['kept']} of {r['in']} records kept ({sum(r['deduplicated'].values())} duplicates, "
        f"{sum(r['dropped'].values())} filtered, {sum(r['quarantined'].values())} quarantined); "
        f"report {Path(cfg.run_dir) / 'clean' / 'report.html'}"
    )
    print(
        f"tokenizer      zh {tok_stats['zh']['chars_per_token']} chars/token, "
        f"en {tok_stats['en']['chars_per_token']} chars/token"
    )
    print(
        f"model          {summary['params'] / 1e6:.2f}M parameters, {summary['steps']} steps, "
        f"{summary['tokens'] / 1e6:.2f}M tokens, {summary['tokens_per_s']:,.0f} tokens/s"
    )
    print(
        f"validation     loss {val.get('val_loss', float('nan')):.3f}  ppl {val.get('val_ppl', float('nan')):.1f}  "
        f"bits/byte {val.get('val_bpb', float('nan')):.3f}  (best loss {summary['best_val_loss']:.3f})"
    )
    print(f"checkpoint     {summary['best_checkpoint']}")
    print(f"loss curve     {Path(cfg.run_dir) / 'pretrain' / 'loss.png'}")
    print(f"samples        {Path(cfg.run_dir) / 'generate' / 'samples.jsonl'}")
    if tuned:
        m = tuned["classify_test"]["metrics"]
        print(
            f"classifier     test accuracy {m['accuracy']:.3f}  macro F1 {m['f1_macro']:.3f}  "
            f"({m['n']} texts, {len(m['labels'])} collections); {Path(cfg.run_dir) / 'evaluate' / 'classify'}"
        )
        c = tuned["chat_test"]["metrics"]
        print(
            f"chat           test loss {c['loss']:.3f}  ppl {c['ppl']:.1f} on assistant tokens; "
            f"replies in {Path(cfg.run_dir) / 'evaluate' / 'chat' / 'samples.jsonl'}"
        )
    c = shrunk["change"]
    print(
        f"compressed     int8: {c['size_ratio']:.2f}x the size, perplexity {c['ppl_delta_pct']:+.2f}%, decode "
        f"{c.get('decode_speedup', float('nan')):.2f}x; report {Path(cfg.run_dir) / 'compress' / 'int8' / 'report.md'}"
    )
    print(f"exported       Hugging Face folder {exported['out']} ({exported['architecture']})")
    from gptforge.report import build_report

    page = build_report(Path(cfg.run_dir))
    print(f"total time     {time.perf_counter() - t0:.0f} s")
    print(f"run report     {page['html']}  (and {page['md']}): every stage of this run on one page")
    out = {"clean": clean_stats, "tokenizer": tok_stats, "pretrain": summary, "generate": samples, **tuned}
    return {**out, "compress": shrunk, "export": exported}


def _compress_and_export(cfg: Config, runtime: Runtime, tuned: bool) -> tuple[dict, dict]:
    import torch

    banner("8/9 compress: int8 weights (4x smaller), measured before and after on the validation split")
    # torch's int8 kernels used here are CPU kernels: the measurement runs on the CPU whatever trained the model.
    cpu = Runtime(torch.device("cpu"), torch.float32)
    pretrained = str(Path(cfg.run_dir) / "pretrain" / "checkpoints")
    shrunk = compress.run(
        compress.Config(ckpt=pretrained, run_dir=cfg.run_dir, quantize="int8", overwrite=True, threads=cfg.threads),
        cpu,
    )
    banner("9/9 export: a Hugging Face folder that transformers loads with no gptforge code")
    source = str(Path(cfg.run_dir) / "finetune" / "chat") if tuned else pretrained
    exported = export.run(export.Config(ckpt=source, format="hf", run_dir=cfg.run_dir, overwrite=True), cpu)
    return shrunk, exported


def _finetune(cfg: Config, runtime: Runtime) -> dict:
    from gptforge.data.demo_tasks import build_demo_tasks

    # The tasks come from the bundled sample's structure (collections, titles, sonnet numbers) whatever the input.
    files = build_demo_tasks(sample_data_dir(), stage_dir(cfg.run_dir, "demo") / "tasks")
    common = dict(run_dir=cfg.run_dir, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads, overwrite=True)
    out = {}
    banner("5/9 finetune classify: which collection does a poem or passage come from?")
    ft = finetune.Config(
        task="classify",
        train_file=str(files["classify_train"]),
        epochs=cfg.classify_epochs,
        class_weights="balanced",
        train=finetune.FINETUNE_TRAIN.model_copy(update={"lr": cfg.finetune_lr}),
        **common,
    )
    out["classify"] = finetune.run(ft, runtime)
    banner("6/9 finetune chat: title and author in, poem out (loss on the answer only, packed)")
    ft = finetune.Config(
        task="chat",
        train_file=str(files["chat_train"]),
        epochs=cfg.chat_epochs,
        train=finetune.FINETUNE_TRAIN.model_copy(update={"lr": cfg.finetune_lr}),
        **common,
    )
    out["chat"] = finetune.run(ft, runtime)
    banner("7/9 evaluate on the test splits the fine-tuning never saw")
    ckpts = Path(cfg.run_dir) / "finetune"
    ev = dict(run_dir=cfg.run_dir, device=cfg.device)
    out["classify_test"] = evaluate.run(
        evaluate.Config(ckpt=str(ckpts / "classify"), data=str(files["classify_test"]), **ev), runtime
    )
    out["chat_test"] = evaluate.run(
        evaluate.Config(ckpt=str(ckpts / "chat"), data=str(files["chat_test"]), samples=4, **ev), runtime
    )
    return out
