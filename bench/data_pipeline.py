"""Data pipeline, side by side: gptforge's `clean` stage vs datatrove, documents/s and near-duplicate quality.

    python bench/data_pipeline.py               # 50,000 documents, 3 interleaved runs per contender, ~10 min on 2 cores
    python bench/data_pipeline.py --quick       # 5,000 documents, 1 run: a smoke test of about a minute

bench-datatrove-env: datatrove is no dependency of gptforge. It lives in the benchmark's own virtual environment,
found through $DATATROVE_PYTHON (default: .bench-venv/datatrove/bin/python in the repository):

    python3 -m venv .bench-venv/datatrove
    .bench-venv/datatrove/bin/pip install datatrove orjson spacy 'xxhash<4' regex tokenizers jieba

orjson, spaCy and `xxhash<4` are what datatrove's MinHash needs at run time; `regex` and `tokenizers` are imported
by `datatrove.pipeline.dedup` without being declared; jieba is its Chinese word segmenter. No spaCy model is
downloaded (datatrove uses `spacy.blank`).

Corpus (bench/dedup_corpus.py, seeded): half Chinese, half English documents of 200-1500 characters drawn from
public-domain Tang/Song poems and Shakespeare, with planted pairs: exact copies (5% of all documents) and copies
edited at 1, 3, 5, 10 and 20% of their units (2.5% of documents each). The measured shingle Jaccard of every rate
is printed and stored, next to the largest Jaccard found among sampled unrelated pairs.

Truth. A copy edited at <= 10% must lose exactly one member of its pair (the tool may keep either one): one member
removed is a true positive, none a false negative, both a false positive. Every other removed document (an
unpaired document, the second member of an exact pair) is a false positive. Copies edited at 20% are left out of
precision and recall and reported separately (share of those pairs deduplicated): a fifth of the units changed
leaves only about half of the 3-unit shingles shared (a third of the 5-unit ones), so whether such a text is "the
same document" is a policy choice of the threshold, not a fact to score. Exact pairs are scored as exact recall.

Contenders, on the same machine, 2 worker processes each, with gptforge's DedupConfig defaults for both (n-gram
size, 128 permutations, threshold; read at run time and stored in the JSON):
* gptforge: `clean.run` in process with the equivalent steps only: read jsonl -> exact dedup -> MinHash LSH ->
  write jsonl. Normalization, boilerplate and repeated-line removal are off and every quality-filter threshold is
  at its "off" value, because datatrove runs none of them (the filter pass itself cannot be switched off).
* datatrove: bench/datatrove_side.py, the same steps as datatrove pipeline steps (ExactDedup* and the four MinHash
  stages under LocalPipelineExecutor, fork workers), with a tokenizer that yields gptforge's units (one token per
  CJK character, one per word) so both tools shingle the same text identically. datatrove merges every LSH
  candidate pair unverified, so it gets the bands x rows that suit that (datasketch's rule, equal weight on false
  positives and negatives) for the same threshold; gptforge verifies candidates with the whole signature and uses
  more bands of fewer rows. This is datatrove at its fastest and most accurate here: the headline ratio's
  denominator.
* datatrove_cmn: the same with datatrove's own Chinese setting (language "cmn": spaCy + jieba words).
* datatrove_gptforge_lsh: datatrove with gptforge's bands x rows, to show what the verification step buys.
* gptforge_defaults: the whole stage as a user gets it (normalization, filters, boilerplate and line dedup on);
  for reference, not part of the ratio.

Timing: wall clock of the pipeline with the libraries already imported (gptforge in process, datatrove inside its
subprocess), from the first read to the last written file. Runs are interleaved, each starts after waiting for
the machine to be quiet, and the share of CPU time taken by other processes during each run is recorded (runs
above 5% are flagged). Headline: median documents/s over runs. Writes bench/results/data_pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from dedup_corpus import RATES, Corpus, build

# Heavy imports (gptforge, benchlib -> torch) stay inside functions: the clean stage spawns worker processes, and
# spawn re-imports this module in each of them.
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "data_pipeline.json"
DEFAULT_DT_PYTHON = ROOT / ".bench-venv" / "datatrove" / "bin" / "python"
# name -> (tool, datatrove tokenizer, LSH bands x rows: "own" = best for unverified candidates, "gptforge" = ours)
CONTENDERS = {
    "gptforge": ("gptforge", "", "gptforge"),
    "datatrove": ("datatrove", "units", "own"),
    "datatrove_cmn": ("datatrove", "cmn", "own"),
    "datatrove_gptforge_lsh": ("datatrove", "units", "gptforge"),
    "gptforge_defaults": ("gptforge", "", "gptforge"),
}
GRAY = "r20"
GOAL_RATIO, GOAL_F1 = 2.0, 0.95
CONTENDED = 0.05
WORKERS = 2


def tree_snapshot() -> tuple[int, int, int] | None:
    """benchlib.cpu_snapshot, but 'own' includes reaped children (our worker processes and the datatrove run)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return sum(vals) - vals[3] - vals[4], sum(vals), sum(int(v) for v in own[11:15])


def permissive(model):
    """A FilterConfig that keeps everything: max_* fractions at 1, max lengths unbounded, min_* at 0, lists empty."""
    values = {}
    for name in type(model).model_fields:
        v = getattr(model, name)
        if isinstance(v, bool):
            values[name] = v if name != "enabled" else False
        elif isinstance(v, int | float) and name.startswith("max_"):
            values[name] = type(v)(1.0) if 0 < v <= 1 else type(v)(10**12)
        elif isinstance(v, int | float) and name.startswith("min_"):
            values[name] = type(v)(0)
        elif isinstance(v, dict) and name.startswith("max_"):
            values[name] = {}
        elif isinstance(v, list):
            values[name] = []
    return type(model)(**{**model.model_dump(), **values})


def dedup_params() -> dict:
    """gptforge's DedupConfig defaults and the LSH bands x rows it picks for them (the rule in
    gptforge.data.dedup.near_duplicate_clusters: optimal_bands, misses weighted 9x when candidates are verified)."""
    from gptforge.data.dedup import DedupConfig, lsh_bands, optimal_bands

    d = DedupConfig()
    out = {"ngram": d.ngram, "num_perm": d.num_perm, "threshold": d.threshold, "verify": d.verify}
    out["gptforge"] = lsh_bands(d.threshold, d.num_perm, d.bands, d.verify)  # what the stage uses (stats.json)
    out["own"] = optimal_bands(round(d.threshold, 6), d.num_perm)  # datatrove merges every candidate: FP = FN weight
    return out


def run_gptforge(corpus_dir: Path, work: Path, defaults: bool) -> dict:
    from gptforge.data.dedup import DedupConfig
    from gptforge.data.filters import FilterConfig
    from gptforge.data.normalize import NormalizeConfig
    from gptforge.data.pipeline import BoilerplateConfig
    from gptforge.data.sources import InputConfig
    from gptforge.stages import clean

    cfg = clean.Config(
        run_dir=str(work), input=[str(corpus_dir)], read=InputConfig(id_field="id"), workers=WORKERS, progress=False
    )
    if not defaults:
        off = {k: (False if isinstance(v, bool) else v) for k, v in NormalizeConfig().model_dump().items()}
        off.update(html="never", mask_pii=[])
        cfg.normalize = NormalizeConfig(**off)
        cfg.filters = permissive(FilterConfig())
        cfg.boilerplate = BoilerplateConfig(enabled=False)
        cfg.dedup = DedupConfig(lines=False)  # near-duplicate settings stay at their defaults
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        stats = clean.run(cfg, None)
    wall = time.perf_counter() - t0
    out = work / "clean"
    removed = {
        r.name: [json.loads(line)["id"] for f in sorted(r.glob("*.jsonl")) for line in f.open(encoding="utf-8")]
        for r in sorted((out / "rejects").glob("*"))
    }
    kept = sum(1 for f in (out / "data").glob("*.jsonl") for _ in f.open(encoding="utf-8"))
    return {"wall_s": wall, "removed": removed, "kept": kept, "extra": {"shards": stats.get("shards")}}


def run_datatrove(py: Path, corpus_dir: Path, work: Path, tokenizer: str, p: dict, lsh: str) -> dict:
    result = work.with_suffix(".json")
    cmd = [str(py), str(ROOT / "bench" / "datatrove_side.py"), "--input", str(corpus_dir), "--work", str(work)]
    bands, rows = p[lsh]
    cmd += ["--out", str(result), "--bands", str(bands), "--rows", str(rows), "--ngram", str(p["ngram"])]
    cmd += ["--workers", str(WORKERS), "--tokenizer", tokenizer]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode:
        raise RuntimeError(f"datatrove run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    data = json.loads(result.read_text())
    extra = {"stage_s": timing["stage_s"], "versions": timing["versions"]}
    return {"wall_s": timing["wall_s"], "removed": data["removed"], "kept": data["kept"], "extra": extra}


def score(c: Corpus, removed_ids: dict[str, list[str]]) -> dict:
    index = {d: i for i, d in enumerate(c.ids)}
    dup_reasons = ("exact_duplicate", "near_duplicate")
    removed = {index[d] for r in dup_reasons for d in removed_ids.get(r, [])}
    hit, pairs, fp = Counter(), Counter(), 0
    hit_lang, pairs_lang = Counter(), Counter()
    for i, k in enumerate(c.kind):
        if k == "base":
            fp += c.partner[i] < 0 and i in removed
            continue
        n = (i in removed) + (c.partner[i] in removed)
        fp += max(n - 1, 0)
        hit[k] += n > 0
        pairs[k] += 1
        hit_lang[k, c.langs[i]] += n > 0
        pairs_lang[k, c.langs[i]] += 1
    pos = [k for k in RATES if k != GRAY]
    tp, fn = sum(hit[k] for k in pos), sum(pairs[k] - hit[k] for k in pos)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / (p + r) if p + r else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "recall_by_rate": {k: hit[k] / pairs[k] for k in RATES if pairs[k]},
        "recall_by_rate_lang": {f"{k}_{lang}": hit_lang[k, lang] / v for (k, lang), v in sorted(pairs_lang.items())},
        "exact_recall": hit["exact"] / pairs["exact"] if pairs["exact"] else None,
        "gray_r20_deduplicated": hit[GRAY] / pairs[GRAY] if pairs[GRAY] else None,
        "removed": {r: len(v) for r, v in removed_ids.items()},
    }


def truth_stats(c: Corpus, ngram: int, samples: int = 20_000) -> dict:
    """Measured shingle Jaccard of the planted pairs (per rate) and the largest among random unrelated pairs."""
    import numpy as np

    from gptforge.data.dedup import shingle_hashes

    def jac(i: int, j: int) -> float:
        a, b = shingle_hashes(c.texts[i], ngram), shingle_hashes(c.texts[j], ngram)  # sorted, distinct
        inter = np.intersect1d(a, b, assume_unique=True).size
        return inter / (a.size + b.size - inter)

    per: dict[str, list[float]] = {}
    for i, k in enumerate(c.kind):
        if k not in ("base", "exact"):
            per.setdefault(k, []).append(jac(i, c.partner[i]))
    rng, unrelated, n = random.Random(7), [], len(c.texts)
    while len(unrelated) < samples:
        i, j = rng.randrange(n), rng.randrange(n)
        if i != j and c.partner[i] != j and c.langs[i] == c.langs[j]:
            unrelated.append(jac(i, j))
    rates = {k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)} for k, v in sorted(per.items())}
    return {"jaccard_by_rate": rates, "unrelated_pairs_sampled": len(unrelated), "unrelated_max": max(unrelated)}


def table(res: dict) -> str:
    q, dps = res["quality"], res["docs_per_s"]
    rates = list(RATES)
    head = "| contender | docs/s (median) | docs/s per run | gptforge speedup | precision | recall | F1 | "
    head += " | ".join(f"{k[1:]}%" for k in rates) + " | exact |"
    rows = [head, "|---|---:|---|---:|---:|---:|---:|" + "---:|" * (len(rates) + 1)]
    for name in CONTENDERS:
        if name not in dps:
            continue
        s = q[name]
        per_run = ", ".join(f"{r['docs_per_s']:,.0f}" for r in res["runs"][name])
        speed = "-" if name.startswith("gptforge") else f"{dps['gptforge'] / dps[name]:.2f}x"
        by_rate = " | ".join(f"{s['recall_by_rate'][k]:.3f}" for k in rates)
        rows.append(
            f"| {name} | {dps[name]:,.0f} | {per_run} | {speed} | {s['precision']:.4f} | {s['recall']:.4f} "
            f"| {s['f1']:.4f} | {by_rate} | {s['exact_recall']:.3f} |"
        )
    t, cfg, m, goal, rob = res["truth"], res["config"], res["machine"], res["goal"], res["robustness"]
    d = cfg["dedup"]
    (gb, gr), (ob, orr) = d["gptforge"], d["own"]
    jac = ", ".join(f"{k[1:]}% {v['mean']:.2f}" for k, v in t["jaccard_by_rate"].items())
    rows += [
        "",
        f"{cfg['docs']:,} documents (half zh, half en, {cfg['mb']:.0f} MB jsonl), {cfg['repeats']} interleaved runs "
        f"each, {WORKERS} workers; {m['cpu']}, {m['date'][:10]}. Per-rate columns: share of planted pairs "
        f"deduplicated (20%: not scored). Mean shingle Jaccard per edit rate: {jac}; largest among "
        f"{t['unrelated_pairs_sampled']:,} unrelated pairs: {t['unrelated_max']:.3f}.",
        f"Dedup (gptforge defaults): {d['ngram']}-unit shingles, {d['num_perm']} permutations, threshold "
        f"{d['threshold']}; LSH bands x rows: gptforge {gb}x{gr} + verification, datatrove and datatrove_cmn "
        f"{ob}x{orr}, datatrove_gptforge_lsh {gb}x{gr}. gptforge ran {res['runs']['gptforge'][0]['shards']} shard(s).",
        f"Ratio vs datatrove (same units): {res['ratio_vs_datatrove']:.2f}x"
        + (f"; vs datatrove_cmn: {res['ratio_vs_datatrove_cmn']:.2f}x" if res["ratio_vs_datatrove_cmn"] else "")
        + f". Goal (>= {GOAL_RATIO}x at F1 >= {GOAL_F1}): "
        f"{'met' if goal['met'] else 'NOT met'}."
        + (
            f" Noisy machine: runs with other load > {CONTENDED:.0%} of the CPUs: {rob['contended_runs']}; ratio over "
            f"uncontended runs only: {rob['ratio_vs_datatrove_uncontended'] or float('nan'):.2f}x."
            if any(rob["contended_runs"].values())
            else ""
        ),
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--docs", type=int, default=50_000, help="corpus size (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per contender, interleaved (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="5,000 documents, 1 run (smoke test)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the .md table is written next to it")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="wait up to this long for a quiet CPU (0: don't)")
    args = ap.parse_args(argv)
    if args.quick:
        args.docs, args.repeats = 5_000, 1
    names = [n for n in CONTENDERS if n in args.contenders.split(",")]
    if not {"gptforge", "datatrove"} <= set(names):
        ap.error("--contenders must include gptforge and datatrove (the ratio needs them)")
    py = Path(os.environ.get("DATATROVE_PYTHON", DEFAULT_DT_PYTHON))
    if not py.is_file():
        sys.exit(f"no datatrove interpreter at {py}: see bench-datatrove-env in {__file__}, or set DATATROVE_PYTHON")

    from benchlib import fmt_share, foreign_share, machine_facts, update_readme, wait_for_quiet

    machine = machine_facts()
    t_total = time.perf_counter()
    corpus = build(args.docs)
    params = dedup_params()
    truth = truth_stats(corpus, params["ngram"])
    print(f"corpus: {args.docs:,} docs, {Counter(corpus.kind)}; Jaccard by rate {truth['jaccard_by_rate']}", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    quality: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-data-") as tmp:
        corpus_dir = Path(tmp) / "corpus"
        mb = sum(p.stat().st_size for p in corpus.write(corpus_dir, shards=WORKERS)) / 2**20
        for rep in range(args.repeats):
            for name in names:
                work = Path(tmp) / f"{name}-{rep}"
                waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
                a = tree_snapshot()
                tool, tokenizer, lsh = CONTENDERS[name]
                if tool == "gptforge":
                    r = run_gptforge(corpus_dir, work, defaults=name == "gptforge_defaults")
                else:
                    r = run_datatrove(py, corpus_dir, work, tokenizer, params, lsh)
                share = foreign_share(a, tree_snapshot())
                s = score(corpus, r["removed"])
                if name in quality and quality[name]["f1"] != s["f1"]:
                    print(f"    note: {name} removed different documents than in its first run", flush=True)
                quality.setdefault(name, s)
                row = {"repeat": rep, "wall_s": round(r["wall_s"], 3), "docs_per_s": args.docs / r["wall_s"]}
                row.update(kept=r["kept"], foreign_cpu_share=share, quiet_wait_s=round(waited, 1), **r["extra"])
                runs[name].append(row)
                print(
                    f"  [{rep + 1}/{args.repeats}] {name:<22} {row['docs_per_s']:>8,.0f} docs/s  "
                    f"({r['wall_s']:.1f}s)  P {s['precision']:.4f} R {s['recall']:.4f} F1 {s['f1']:.4f}  "
                    f"other load {fmt_share(share)}",
                    flush=True,
                )
                shutil.rmtree(work, ignore_errors=True)

    dps = {n: statistics.median(r["docs_per_s"] for r in runs[n]) for n in names}
    quiet = {n: [r["docs_per_s"] for r in runs[n] if (r["foreign_cpu_share"] or 0) <= CONTENDED] for n in names}
    quiet_med = {n: statistics.median(v) if v else None for n, v in quiet.items()}
    ratio = dps["gptforge"] / dps["datatrove"]
    f1 = quality["gptforge"]["f1"]
    versions = runs["datatrove"][0].pop("versions")
    for n in names:
        for r in runs[n]:
            r.pop("versions", None)
    g = quality["gptforge"]
    res = {
        "benchmark": "data_pipeline",
        "docs_per_s": dps,
        "ratio_vs_datatrove": ratio,
        "ratio_vs_datatrove_cmn": dps["gptforge"] / dps["datatrove_cmn"] if "datatrove_cmn" in dps else None,
        "near_dup": {"precision": g["precision"], "recall": g["recall"], "f1": g["f1"]},
        "near_dup_recall_by_edit_rate": g["recall_by_rate"],
        "goal": {"min_ratio": GOAL_RATIO, "min_f1": GOAL_F1, "met": ratio >= GOAL_RATIO and f1 >= GOAL_F1},
        "quality": quality,
        "truth": truth,
        "robustness": {
            "contended_threshold": CONTENDED,
            "contended_runs": {n: len(runs[n]) - len(quiet[n]) for n in names},
            "docs_per_s_uncontended_median": quiet_med,
            "ratio_vs_datatrove_uncontended": quiet_med["gptforge"] / quiet_med["datatrove"]
            if quiet_med["gptforge"] and quiet_med["datatrove"]
            else None,
        },
        "config": {
            "docs": args.docs,
            "mb": mb,
            "repeats": args.repeats,
            "workers": WORKERS,
            "dedup": params,
            "corpus": corpus.meta,
            "datatrove_versions": versions,
        },
        "machine": machine,
        "runs": runs,
        "script_seconds": round(time.perf_counter() - t_total, 1),
    }
    md = table(res)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("# Data pipeline: gptforge clean vs datatrove\n\n" + md + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    markers = ("<!-- data_pipeline:begin -->", "<!-- data_pipeline:end -->")
    if not args.quick and update_readme(ROOT / "README.md", md, *markers):
        print("updated the table in README.md")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
