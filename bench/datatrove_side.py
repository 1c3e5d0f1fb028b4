"""datatrove's side of bench/data_pipeline.py. Runs under the benchmark's own interpreter (DATATROVE_PYTHON), never
under gptforge's: datatrove is not a dependency of the package.

    $DATATROVE_PYTHON bench/datatrove_side.py --input CORPUS_DIR --work WORK_DIR --bands B --rows R --out result.json

Pipeline (the equivalent of gptforge's clean stage with normalization and quality filters off), each stage a
LocalPipelineExecutor, `--workers` processes, one task per input shard:

1. JsonlReader -> ExactDedupSignature (xxhash64 of the raw text)
2. ExactFindDedups
3. JsonlReader -> ExactDedupFilter -> MinhashDedupSignature
4. MinhashDedupBuckets (one task per band)
5. MinhashDedupCluster
6. JsonlReader -> ExactDedupFilter -> MinhashDedupFilter -> JsonlWriter (uncompressed; removed documents go to
   exclusion writers, one per reason)

Workers are forked (`--start-method fork`) rather than started by datatrove's default forkserver: on 5,000 documents
that took 3.5 s instead of 5.3 s, and forked workers are reaped children, so the benchmark can count their CPU time.
Stage 6 re-reads and re-filters instead of stage 3 writing an intermediate copy: that is how datatrove's own MinHash
examples chain a filtering pass into dedup, and reading jsonl costs less than writing and reading it again.

`--tokenizer units` gives MinhashDedupSignature a custom WordTokenizer (the documented `language=` hook accepts a
WordTokenizer instance) with gptforge's units: one token per CJK character, one per run of letters/digits. Shingles
then mean the same thing on both sides. `--tokenizer cmn` is what a datatrove user would pick for Chinese: spaCy's
zh tokenizer with jieba word segmentation (applied to the whole mixed corpus; English still splits on spaces).
Prints one JSON line with the wall time; writes the removed ids to `--out`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from importlib.metadata import version
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer

# Same character classes as gptforge.data.text.UNIT_RE (copied: this interpreter cannot import gptforge).
CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0003134f"
UNIT_RE = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")


class UnitTokenizer(WordTokenizer):
    def word_tokenize(self, text: str) -> list[str]:
        return UNIT_RE.findall(text.lower())

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def text_of(doc: Document) -> str:
    return doc.text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bands", type=int, required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", choices=("units", "cmn"), default="units")
    ap.add_argument("--start-method", default="fork", choices=("fork", "forkserver", "spawn"))
    args = ap.parse_args()

    work = Path(args.work)
    shards = len(list(Path(args.input).glob("*.jsonl")))
    exact_cfg = ExactDedupConfig(content_getter=text_of)
    mh_cfg = MinhashConfig(n_grams=args.ngram, num_buckets=args.bands, hashes_per_bucket=args.rows, seed=1)
    language = UnitTokenizer() if args.tokenizer == "units" else "cmn"

    def reader():
        return JsonlReader(args.input, glob_pattern="*.jsonl", add_file_path=False)

    def exact_filter(reason: str | None = None):
        writer = JsonlWriter(f"{work}/removed/exact_duplicate", compression=None) if reason else None
        return ExactDedupFilter(f"{work}/exact_dups", config=exact_cfg, exclusion_writer=writer)

    def executor(pipeline, tasks, name):
        return LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=min(args.workers, tasks),
            logging_dir=f"{work}/logs/{name}",
            skip_completed=False,
            start_method=args.start_method,
        )

    stages = [
        ("exact_sig", executor([reader(), ExactDedupSignature(f"{work}/exact_sigs", exact_cfg)], shards, "s1")),
        (
            "exact_find",
            executor([ExactFindDedups(f"{work}/exact_sigs", f"{work}/exact_dups", config=exact_cfg)], 1, "s2"),
        ),
        (
            "minhash_sig",
            executor(
                [reader(), exact_filter(), MinhashDedupSignature(f"{work}/mh_sigs", mh_cfg, language=language)],
                shards,
                "s3",
            ),
        ),
        (
            "minhash_buckets",
            executor([MinhashDedupBuckets(f"{work}/mh_sigs", f"{work}/mh_buckets", config=mh_cfg)], args.bands, "s4"),
        ),
        (
            "minhash_cluster",
            executor([MinhashDedupCluster(f"{work}/mh_buckets", f"{work}/mh_remove", config=mh_cfg)], 1, "s5"),
        ),
        (
            "filter_write",
            executor(
                [
                    reader(),
                    exact_filter("exact_duplicate"),
                    MinhashDedupFilter(
                        f"{work}/mh_remove",
                        exclusion_writer=JsonlWriter(f"{work}/removed/near_duplicate", compression=None),
                    ),
                    JsonlWriter(f"{work}/output", compression=None),
                ],
                shards,
                "s6",
            ),
        ),
    ]
    stage_s = {}
    t0 = time.perf_counter()
    for name, ex in stages:
        t = time.perf_counter()
        ex.run()
        stage_s[name] = round(time.perf_counter() - t, 3)
    wall = time.perf_counter() - t0

    removed = {}
    for reason in ("exact_duplicate", "near_duplicate"):
        ids = []
        for f in sorted((work / "removed" / reason).glob("*.jsonl")):
            ids += [json.loads(line)["id"] for line in f.open(encoding="utf-8")]
        removed[reason] = ids
    kept = sum(1 for f in (work / "output").glob("*.jsonl") for _ in f.open(encoding="utf-8"))
    Path(args.out).write_text(json.dumps({"removed": removed, "kept": kept}))
    versions = {p: version(p) for p in ("datatrove", "spacy", "jieba", "xxhash", "orjson", "numpy")}
    print(json.dumps({"wall_s": wall, "stage_s": stage_s, "kept": kept, "versions": versions}))


if __name__ == "__main__":  # required: the executor's forkserver workers import this module
    main()
