"""Does augmentation help when labels are scarce? A classifier fine-tuned on 5% of a training set, with and without
augmented copies, at the same training budget, over several seeds.

    python bench/augment_lowdata.py                          # defaults: 5 seeds, ~8 min on 2 quiet cores (17 shared)
    python bench/augment_lowdata.py --init runs/demo/pretrain   # reuse a pretrained model, skip the setup
    python bench/augment_lowdata.py --seeds 2 --steps 20 --pretrain-steps 50 --out /tmp/aug.json   # quick look

Setup (once, in process, with the demo's stages and model shape): `clean` and `tokenizer` on the bundled sample,
then `pretrain` of the demo model (4 layers, 256 wide, ~5M parameters) for `--pretrain-steps` steps, or `--init PATH`
to start from an existing pretrain folder. Every seed and both arms fine-tune from this one model, so the spread
across seeds is the spread of the data subset and of fine-tuning, not of pretraining.

Task: `build_demo_tasks`, "which collection is this text from" (Tang poems, Song ci, Shakespeare sonnets, Shakespeare
play passages): 618 train and 110 test texts; the test split is chosen by a hash of the text and never trained on.

Protocol:
* Validation: one fixed, stratified `--val-fraction` of the train split (seed-independent), used by both arms of
  every seed to pick the best checkpoint. It is never part of any training subset. It is larger than the training
  subset, which a real low-data project would not have; it only picks a checkpoint, for both arms alike.
* Training subset: per seed, a stratified `--fraction` of the train split (per class round(fraction * n_class), at
  least 2), drawn from what the validation set left.
* Two arms per seed, `finetune.run` with everything equal but `augment.n_per_record` (0 vs `--k`): the same seed
  (so the same head init, and the augmenter's seed), the same optimizer steps (`epochs=0`, `train.max_steps=--steps`,
  early stopping off, so neither arm stops sooner), batch size, learning-rate schedule, class weights ("balanced",
  as in the demo) and evaluation points. The only difference is the data the batches are drawn from: the subset
  alone, or the subset plus its augmented copies (EDA operations and character noise, `gptforge.data.augment`;
  synonyms mined from the subset only). "Same budget" is therefore the same number of examples seen, not the same
  number of epochs: the plain arm repeats its few texts more often.
* Score: macro-F1 (and accuracy) of each arm's best checkpoint on the full test split, with `evaluate.run`.

Reported: per seed f1_without, f1_with and delta = f1_with - f1_without (paired: same subset, same init). Across
seeds: mean and median of each arm, `delta_mean`, `delta_std` (sample standard deviation), the 95% t-interval of the
mean delta, and how many seeds went each way. The top-level `f1_without` and `f1_with` are means, so that
`delta_mean == f1_with - f1_without`. The verdict says "within noise" when the interval includes 0: five seeds
and 110 test texts cannot resolve small effects, and the table does not pretend they can.

Trade-offs: one pretrained model and one task (a small, partly easy one: Chinese vs English is free, Tang vs Song
and sonnet vs play are not); the pretraining corpus contains the task texts without labels (as in the demo), the
same for both arms. Stage output goes to `<workdir>/log.txt` instead of the terminal. Writes the JSON (`--out`)
and a Markdown table next to it, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from benchlib import machine_facts

from gptforge import SAMPLE, sample_data_dir
from gptforge.data.augment import AugmentConfig
from gptforge.data.demo_tasks import build_demo_tasks
from gptforge.demo import DEMO_MODEL, DEMO_TRAIN
from gptforge.runtime import Runtime, build_runtime
from gptforge.stages import clean, evaluate, finetune, pretrain, tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "augment_lowdata.json"
ARMS = ("without", "with")
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (any statistics table); beyond 30 the normal
# 1.96 understates the interval by under 2%.
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Setup: the pretrained model and the task files


def pretrain_model(workdir: Path, steps: int, runtime: Runtime, log) -> tuple[str, dict]:
    """clean -> tokenizer -> pretrain with the demo's model shape; returns (init folder, facts about it)."""
    run_dir = str(workdir)
    with contextlib.redirect_stdout(log):
        clean.run(clean.Config(run_dir=run_dir, input=[SAMPLE], overwrite=True, progress=False), None)
        text = str(workdir / "clean" / "data")
        tokenizer.run(tokenizer.Config(run_dir=run_dir, input=text, overwrite=True), runtime)
        # The demo's schedule, shortened: warmup and evaluation scale with the step count.
        train = DEMO_TRAIN.model_copy(
            update={
                "max_steps": steps,
                "warmup_steps": max(1, min(DEMO_TRAIN.warmup_steps, steps // 10)),
                "eval_every": max(1, steps // 3),
                "save_every": steps,
                "early_stop_patience": 0,
            }
        )
        cfg = pretrain.Config(
            run_dir=run_dir, input=text, model=DEMO_MODEL, train=train, overwrite=True, progress=False
        )
        summary = pretrain.run(cfg, runtime)
    facts = {
        "source": "pretrained here",
        "steps": summary["steps"],
        "params": summary["params"],
        "val_loss": summary["val"].get("val_loss"),
        "seconds": summary.get("seconds"),
    }
    return str(workdir / "pretrain"), facts


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def stratified_pick(labels: list[str], want: dict[str, int], rng: np.random.Generator) -> list[int]:
    """Indices of `want[c]` items of every class c, drawn without replacement; sorted, so file order is stable."""
    picked: list[int] = []
    for c in sorted(want):
        pool = [i for i, y in enumerate(labels) if y == c]
        if want[c] > len(pool):
            raise ValueError(f"class {c!r}: {want[c]} items wanted, only {len(pool)} left after the validation split")
        picked += rng.choice(pool, size=want[c], replace=False).tolist()
    return sorted(picked)


def per_class(counts: Counter, fraction: float, minimum: int) -> dict[str, int]:
    return {c: max(minimum, round(fraction * n)) for c, n in counts.items()}


# --------------------------------------------------------------------------------------------------------------------
# One arm: fine-tune, then score the best checkpoint on the test split


def run_arm(args, arm: str, seed: int, files: dict[str, Path], init: str, runtime: Runtime, log) -> dict:
    name = f"seed{seed}-{arm}"
    train = finetune.FINETUNE_TRAIN.model_copy(
        update={
            "max_steps": args.steps,
            "micro_batch_size": args.batch,
            "lr": args.lr,
            "eval_every": args.eval_every,
            "early_stop_patience": 0,  # both arms run every step: equal budgets, not equal patience
        }
    )
    cfg = finetune.Config(
        run_dir=str(args.workdir),
        name=name,
        task="classify",
        init=init,
        train_file=str(files["train"]),
        val_file=str(files["val"]),
        epochs=0,  # max_steps decides, not the (augmentation-dependent) epoch length
        evals_per_epoch=0,
        class_weights="balanced",
        seed=seed,
        overwrite=True,
        progress=False,
        augment=AugmentConfig(n_per_record=args.k if arm == "with" else 0),
        train=train,
    )
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        ft = finetune.run(cfg, runtime)
        ev = evaluate.run(
            evaluate.Config(
                ckpt=str(finetune.out_dir(cfg)), data=str(files["test"]), run_dir=str(args.workdir), name=name
            ),
            runtime,
        )
    m = ev["metrics"]
    return {
        "f1_macro": m["f1_macro"],
        "accuracy": m["accuracy"],
        "test_texts": m["n"],
        "train_examples": ft["data"]["train_items"] + ft["data"].get("augmented_copies", 0),
        "augmented_copies": ft["data"].get("augmented_copies", 0),
        "steps": ft["steps"],
        "best_step": ft["best_step"],
        "val_f1_macro_best": ft["best"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------------------------------
# Statistics and reporting


def summarize(rows: list[dict]) -> dict:
    """Across-seed statistics of the paired deltas; std and interval are None with a single seed."""
    f1 = {arm: [r[arm]["f1_macro"] for r in rows] for arm in ARMS}
    acc = {arm: [r[arm]["accuracy"] for r in rows] for arm in ARMS}
    deltas = [r["delta"] for r in rows]
    n = len(deltas)
    mean = statistics.fmean(deltas)
    std = statistics.stdev(deltas) if n > 1 else None
    ci = None
    if std is not None:
        half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    if ci is None:
        verdict = "one seed: no spread, no verdict"
    elif ci[0] > 0:
        verdict = "augmentation raised test macro-F1 (the 95% interval of the mean delta excludes 0)"
    elif ci[1] < 0:
        verdict = "augmentation lowered test macro-F1 (the 95% interval of the mean delta excludes 0)"
    else:
        verdict = "within noise: the 95% interval of the mean delta includes 0"
    return {
        "f1_without": statistics.fmean(f1["without"]),
        "f1_with": statistics.fmean(f1["with"]),
        "delta_mean": mean,
        "delta_std": std,
        "f1_without_median": statistics.median(f1["without"]),
        "f1_with_median": statistics.median(f1["with"]),
        "delta_median": statistics.median(deltas),
        "delta_ci95": ci,
        "accuracy_without": statistics.fmean(acc["without"]),
        "accuracy_with": statistics.fmean(acc["with"]),
        "seeds_better": sum(d > 0 for d in deltas),
        "seeds_worse": sum(d < 0 for d in deltas),
        "seeds_tied": sum(d == 0 for d in deltas),
        "verdict": verdict,
    }


def table(result: dict) -> str:
    s, cfg = result["settings"], result
    lines = [
        "| seed | train texts | + augmented copies | macro-F1 without | macro-F1 with | delta | acc. without "
        "| acc. with | best step without / with |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["seeds"]:
        w, a = r["without"], r["with"]
        lines.append(
            f"| {r['seed']} | {r['train_texts']} | {a['augmented_copies']} | {w['f1_macro']:.3f} | "
            f"{a['f1_macro']:.3f} | {r['delta']:+.3f} | {w['accuracy']:.3f} | {a['accuracy']:.3f} | "
            f"{w['best_step']} / {a['best_step']} |"
        )
    std = "n/a" if cfg["delta_std"] is None else f"{cfg['delta_std']:.3f}"
    ci = "n/a" if cfg["delta_ci95"] is None else f"[{cfg['delta_ci95'][0]:+.3f}, {cfg['delta_ci95'][1]:+.3f}]"
    lines.append(
        f"| **mean** | | | **{cfg['f1_without']:.3f}** | **{cfg['f1_with']:.3f}** | **{cfg['delta_mean']:+.3f}** "
        f"| {cfg['accuracy_without']:.3f} | {cfg['accuracy_with']:.3f} | |"
    )
    lines.append(
        f"| median | | | {cfg['f1_without_median']:.3f} | {cfg['f1_with_median']:.3f} | {cfg['delta_median']:+.3f} "
        "| | | |"
    )
    m, p = result["machine"], result["pretrained"]
    lines += [
        "",
        f"Delta (with - without, paired by seed): mean {cfg['delta_mean']:+.3f}, sample std {std}, 95% t-interval "
        f"of the mean {ci}; better in {cfg['seeds_better']}, worse in {cfg['seeds_worse']}, tied in "
        f"{cfg['seeds_tied']} of {len(result['seeds'])} seeds. Verdict: **{cfg['verdict']}**.",
        "",
        f"Task: demo collection classifier (4 classes), {s['fraction']:.0%} of {s['train_split']} train texts per "
        f"seed (stratified, >= {s['min_per_class']} per class), fixed validation set of {s['val_texts']} train "
        f"texts for checkpoint choice, scored on all {s['test_texts']} test texts. Both arms: {s['steps']} steps x "
        f"batch {s['batch']}, LR {s['lr']:g}, balanced class weights, eval every {s['eval_every']} steps, best "
        f"checkpoint; with = + {s['k']} augmented copies per text. Init: {p['source']} "
        f"({p.get('steps', '?')} pretraining steps). {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, "
        f"{m['date'][:10]}.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="seeds (subsets x both arms) (default %(default)s)")
    ap.add_argument("--fraction", type=float, default=0.05, help="share of the train split trained on (default 5%%)")
    ap.add_argument("--min-per-class", type=int, default=2, help="fewest training texts per class (default 2)")
    ap.add_argument("--val-fraction", type=float, default=0.10, help="fixed validation share of the train split")
    ap.add_argument("--k", type=int, default=4, help="augment.n_per_record of the 'with' arm (default %(default)s)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of every run (default %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch size (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, the demo's (default %(default)s)")
    ap.add_argument("--eval-every", type=int, default=5, help="validation every N steps (default %(default)s)")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="steps of the setup pretraining (default 300)")
    ap.add_argument("--init", type=Path, default=None, help="existing pretrain folder to start from (skips setup)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep every run's files here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the .md table is written next to it")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default %(default)s)")
    ap.add_argument("--dtype", default="auto", help="training autocast dtype: auto, bfloat16, float32")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.k < 1 or args.steps < 1 or args.batch < 1 or args.eval_every < 1:
        ap.error("--seeds, --k, --steps, --batch and --eval-every must be at least 1")
    if not 0 < args.fraction < 1 or not 0 < args.val_fraction < 1 or args.fraction + args.val_fraction >= 1:
        ap.error(f"--fraction {args.fraction} and --val-fraction {args.val_fraction}: each in (0, 1), sum below 1")
    if args.init is not None and not args.init.exists():
        ap.error(f"--init {args.init}: no such folder (a pretrain folder such as runs/demo/pretrain)")
    if args.init is None and args.pretrain_steps < 1:
        ap.error("--pretrain-steps must be at least 1")

    t_total = time.perf_counter()
    machine = machine_facts()  # before the runs: the git commit and date describe the code that was measured
    runtime = build_runtime(args.device, args.dtype)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gptforge-augment-")))
        args.workdir.mkdir(parents=True, exist_ok=True)
        log = stack.enter_context(open(args.workdir / "log.txt", "a", encoding="utf-8"))  # noqa: SIM115
        print(f"workdir {args.workdir}; stage output goes to {args.workdir / 'log.txt'}", flush=True)

        if args.init is None:
            print(f"setup: clean + tokenizer + pretrain ({args.pretrain_steps} steps) ...", flush=True)
            init, pretrained = pretrain_model(args.workdir, args.pretrain_steps, runtime, log)
            print(f"  pretrained in {time.perf_counter() - t_total:.0f}s, val loss {pretrained['val_loss']:.3f}")
        else:
            init, pretrained = str(args.init), {"source": f"--init {args.init}"}

        tasks = build_demo_tasks(sample_data_dir(), args.workdir / "tasks")
        train_rows, test_rows = read_jsonl(tasks["classify_train"]), read_jsonl(tasks["classify_test"])
        counts = Counter(r["label"] for r in train_rows)
        # The validation set does not depend on the seed: every seed and arm chooses checkpoints on the same texts.
        val_idx = set(
            stratified_pick(
                [r["label"] for r in train_rows], per_class(counts, args.val_fraction, 1), np.random.default_rng(0)
            )
        )
        pool = [r for i, r in enumerate(train_rows) if i not in val_idx]
        val_path = write_jsonl(args.workdir / "data" / "val.jsonl", [train_rows[i] for i in sorted(val_idx)])
        want = per_class(counts, args.fraction, args.min_per_class)
        if sum(want.values()) < args.batch:
            raise ValueError(
                f"--fraction {args.fraction} gives {sum(want.values())} training texts, fewer than one batch of "
                f"--batch {args.batch}; lower --batch or raise --fraction"
            )
        print(
            f"task: {len(train_rows)} train / {len(test_rows)} test texts; validation {len(val_idx)}; "
            f"{sum(want.values())} training texts per seed {dict(sorted(want.items()))}",
            flush=True,
        )

        rows = []
        for seed in range(args.seeds):
            picked = stratified_pick([r["label"] for r in pool], want, np.random.default_rng([seed, 1]))
            files = {
                "train": write_jsonl(args.workdir / "data" / f"seed{seed}-train.jsonl", [pool[i] for i in picked]),
                "val": val_path,
                "test": tasks["classify_test"],
            }
            row: dict = {"seed": seed, "train_texts": len(picked)}
            for arm in ARMS:
                row[arm] = run_arm(args, arm, seed, files, init, runtime, log)
                r = row[arm]
                print(
                    f"  seed {seed} {arm:<7} {r['train_examples']:>4} examples, best step {r['best_step']:>3}: "
                    f"test macro-F1 {r['f1_macro']:.3f}  accuracy {r['accuracy']:.3f}  ({r['seconds']:.0f}s)",
                    flush=True,
                )
            if row["without"]["steps"] != row["with"]["steps"]:  # the budget is the point of the comparison
                raise RuntimeError(f"seed {seed}: arms ran {row['without']['steps']} vs {row['with']['steps']} steps")
            row["delta"] = row["with"]["f1_macro"] - row["without"]["f1_macro"]
            rows.append(row)

    settings = {
        "fraction": args.fraction,
        "min_per_class": args.min_per_class,
        "val_fraction": args.val_fraction,
        "k": args.k,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "eval_every": args.eval_every,
        "class_weights": "balanced",
        "early_stopping": "off",
        "monitor": "val_f1_macro (best checkpoint)",
        "augment": AugmentConfig(n_per_record=args.k).model_dump(),
        "train_split": len(train_rows),
        "val_texts": len(val_idx),
        "test_texts": len(test_rows),
        "train_texts_per_class": dict(sorted(want.items())),
        "seeds": list(range(args.seeds)),
        "runtime": runtime.describe(),
        "pretrain_steps": None if args.init else args.pretrain_steps,
    }
    result = {
        "benchmark": "augment_lowdata",
        **summarize(rows),
        "seeds": rows,
        "settings": settings,
        "pretrained": pretrained,
        "machine": machine,
        "script_seconds": round(time.perf_counter() - t_total, 1),
    }
    md = table(result)
    print()
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    md_path = args.out.with_suffix(".md")
    md_path.write_text(f"# Augmentation at {args.fraction:.0%} of the training data\n\n" + md + "\n")
    print(f"\nwrote {args.out} and {md_path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
