"""`gptforge clean`: turn a messy folder of text into clean, deduplicated, decontaminated documents.

Reads folders, files or globs of .txt/.md/.html/.jsonl/.json/.csv/.tsv/.parquet (optionally .gz/.zst) in UTF-8/16/32,
GB18030/GBK or Big5; normalizes, filters, removes exact and near duplicates and boilerplate lines, drops documents
that overlap evaluation files; writes under `<run_dir>/clean/`: `data/part-*.jsonl` (or .parquet), `rejects/<reason>/`,
`quarantine/`, `stats.json`, `report.md`, `report.html` and the resolved `config.yaml`.

Every input file is counted as ok, skipped or quarantined, and every record as kept, dropped (by reason),
deduplicated or quarantined; the counts balance exactly. Work is split into shards run by worker processes; the
output is the same for any worker count, and a killed run continues where it stopped. Across machines (a shared
folder), run the same command with `--rank R --world_size W` on each: every rank scans and writes its share of the
shards, rank 0 deduplicates and reports in between, and the ranks wait for each other through marker files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptforge import SAMPLE
from gptforge.artifacts import append_ledger, atomic_write_text, save_config, stage_dir, write_json
from gptforge.data import pipeline, report
from gptforge.data.decontam import DecontamConfig
from gptforge.data.dedup import DedupConfig
from gptforge.data.filters import FilterConfig
from gptforge.data.normalize import NormalizeConfig
from gptforge.data.sources import InputConfig, discover

if TYPE_CHECKING:
    from gptforge.runtime import Runtime

NEEDS_TORCH = False  # cli: no runtime (device, dtype) to build, so torch is never imported

class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/default", description="Run directory; outputs go to <run_dir>/clean/.")
    input: list[str] = Field(
        default_factory=lambda: [SAMPLE], description="Folders, files or globs to read; @sample is the bundled corpus."
    )
    read: InputConfig = Field(default_factory=InputConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    boilerplate: pipeline.BoilerplateConfig = Field(default_factory=pipeline.BoilerplateConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    output: pipeline.OutputConfig = Field(default_factory=pipeline.OutputConfig)
    workers: int = Field(0, ge=0, description="Worker processes; 0 = one per CPU core.")
    shard_mb: float = Field(32.0, gt=0, description="Input megabytes per shard (the unit of parallel work and memory).")
    rank: int = Field(-1, ge=-1, description="This machine's rank for multi-machine runs; -1 reads $RANK (else 0).")
    world_size: int = Field(0, ge=0, description="Number of machines; 0 reads $WORLD_SIZE (else 1).")
    step: str = Field(
        "all", pattern="^(all|scan|dedup|write|report)$", description="Run one step only: scan, dedup, write, report."
    )
    wait_timeout_s: float = Field(86400.0, gt=0, description="How long a rank waits for the others' steps.")
    overwrite: bool = Field(False, description="Discard a previous clean run with other settings or input.")
    progress: bool = Field(True, description="Show progress bars.")

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    def settings(self) -> pipeline.Settings:
        keys = pipeline.Settings.model_fields
        return pipeline.Settings(**{k: getattr(self, k) for k in keys})


def _rank_world(cfg: Config) -> tuple[int, int]:
    world = cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    rank = cfg.rank if cfg.rank >= 0 else int(os.environ.get("RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world_size {world}")
    return rank, world


def _check_plan(out: Path, fingerprint: dict, overwrite: bool) -> None:
    """A run folder belongs to one input and one set of settings; mixing two would corrupt the accounting."""
    path = out / "work" / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text("utf-8"))
        if old != fingerprint:
            if not overwrite:
                what = next(k for k in fingerprint if old.get(k) != fingerprint[k])
                raise ValueError(
                    f"{out} holds a clean run with different {what}; pass --overwrite to start over "
                    "or use another run_dir"
                )
            for name in ("data", "rejects", "quarantine", "work"):
                shutil.rmtree(out / name, ignore_errors=True)
    elif overwrite:
        for name in ("data", "rejects", "quarantine"):
            shutil.rmtree(out / name, ignore_errors=True)
    if not path.is_file():
        atomic_write_text(path, json.dumps(fingerprint, ensure_ascii=False))


def _wait_for(paths: list[Path], what: str, timeout: float) -> None:
    deadline, told = time.monotonic() + timeout, False
    while missing := [p for p in paths if not p.exists()]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}: {len(missing)} missing, e.g. {missing[0]}")
        if not told:
            print(f"waiting for other ranks to finish {what} ({len(missing)} of {len(paths)} pending)", flush=True)
            told = True
        time.sleep(0.5)


def _run_parallel(fn, jobs: list[tuple], workers: int, desc: str, progress: bool) -> None:
    """Run fn(*job) for every job; with one worker in this process (no pickling, easy to debug)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="shard", disable=not progress or not jobs, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                fn(*job)
                bar.update()
            return
        # spawn, not fork: the parent may hold threads (torch, tqdm's monitor) that fork would copy mid-lock.
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            for fut in [pool.submit(fn, *job) for job in jobs]:
                fut.result()
                bar.update()
    finally:
        bar.close()


def run(cfg: Config, runtime: Runtime | None = None) -> dict:
    t0 = time.perf_counter()
    rank, world = _rank_world(cfg)
    settings = cfg.settings()
    settings_json = settings.model_dump_json()
    files = discover(cfg.input)
    shards = pipeline.plan_shards(files, cfg.read, int(cfg.shard_mb * 2**20))
    out = stage_dir(cfg.run_dir, "clean")
    (out / "work").mkdir(exist_ok=True)
    _check_plan(out, pipeline.plan_fingerprint(cfg.input, files, shards, settings), cfg.overwrite)
    save_config(cfg, out)
    workers = cfg.workers or os.cpu_count() or 1
    scan_dir, mine = out / "work" / "scan", [i for i in range(len(shards)) if i % world == rank]
    scan_markers = [scan_dir / pipeline.part(i) / "stats.json" for i in range(len(shards))]
    if cfg.step in ("all", "scan"):
        todo = [i for i in mine if not scan_markers[i].is_file()]
        print(f"clean: {len(files)} files in {len(shards)} shards; scanning {len(todo)} (rank {rank}/{world})")
        jobs = [(i, shards[i], files, settings_json, out) for i in todo]
        _run_parallel(pipeline.scan_shard, jobs, workers, "scan", cfg.progress)
    dedup_marker = out / "work" / "dedup" / "stats.json"
    if cfg.step in ("all", "dedup"):
        _wait_for(scan_markers, "scanning", cfg.wait_timeout_s)
        if rank == 0 and not dedup_marker.is_file():
            print("clean: deduplicating (exact, MinHash LSH, boilerplate and repeated lines)", flush=True)
            pipeline.dedup_all(len(shards), settings_json, out)
    write_markers = [out / "work" / "write" / f"{pipeline.part(i)}.json" for i in range(len(shards))]
    if cfg.step in ("all", "write"):
        _wait_for([dedup_marker], "deduplication", cfg.wait_timeout_s)
        counts = [json.loads(m.read_text("utf-8"))["candidates"] for m in scan_markers]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        todo = [i for i in mine if not write_markers[i].is_file()]
        jobs = [(i, settings_json, out, offsets[i]) for i in todo]
        _run_parallel(pipeline.write_shard, jobs, workers, "write", cfg.progress)
    stats: dict = {}
    if cfg.step in ("all", "report") and rank == 0:
        _wait_for(write_markers, "writing", cfg.wait_timeout_s)
        stats = report.aggregate(out, len(shards), files)
        stats.update(seconds=round(time.perf_counter() - t0, 2), shards=len(shards), workers=workers)
        stats["docs_per_s"] = round(stats["records"]["in"] / max(stats["seconds"], 1e-9), 1)
        write_json(out / "stats.json", stats)
        report.render(out, stats)
        if not cfg.output.keep_work:
            shutil.rmtree(out / "work", ignore_errors=True)
        append_ledger(cfg.run_dir, "clean", "ok", {k: stats[k] for k in ("files", "records", "seconds")})
        print(report.summary(stats, out))
    return stats
