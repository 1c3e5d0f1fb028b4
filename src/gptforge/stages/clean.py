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

`plan.json` (beside the outputs) pins the input files, settings, evaluation files and shard plan: a re-run with any
of them changed is refused (or, with --overwrite, starts from scratch). Rank 0 writes it, and the other ranks start
only once it matches their own plan and world size, so ranks started with different settings fail instead of
processing some shards twice and others never. On one machine, a step whose inputs are missing (--step write
before dedup) is an error naming the step to run, not a wait.
"""

from __future__ import annotations

import itertools
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
from gptforge.data import clean_io, pipeline, report
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
    shard_mb: float = Field(
        32.0,
        gt=0,
        description="Largest input megabytes per shard (the unit of parallel work and memory); smaller inputs are cut "
        "into about 32 shards of at least 1 MB so every core gets work.",
    )
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


def _env_int(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def shard_bytes(shard_mb: float, total: int) -> int:
    """Shard size from the input size only, never from the worker count: the output must not depend on it."""
    return int(min(shard_mb * 2**20, max(2**20, total / 32)))


def _rank_world(cfg: Config) -> tuple[int, int]:
    world = cfg.world_size or _env_int("WORLD_SIZE", "1")
    rank = cfg.rank if cfg.rank >= 0 else _env_int("RANK", "0")
    if not 0 <= rank < world:
        src = "--world_size" if cfg.world_size else "$WORLD_SIZE (or 1 when unset; set --world_size)"
        raise ValueError(f"rank {rank} is outside world_size {world} from {src}: ranks are 0 .. world_size-1")
    return rank, world


OUTPUTS = ("data", "rejects", "quarantine", "work", "report", "stats.json", "files.jsonl", "report.md", "report.html")


def _clear(out: Path) -> None:
    """Remove a previous run's outputs (the plan first: a kill part-way leaves a folder that is cleared again)."""
    (out / "plan.json").unlink(missing_ok=True)
    for name in (*OUTPUTS, *(p.name for p in out.glob(".work-trash-*"))):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _difference(old: dict, new: dict) -> str:
    """What differs between two plan fingerprints, in words a user can act on."""
    key = next((k for k in new if old.get(k) != new[k]), "plan format (an older gptforge)")
    if key == "settings":
        flat_old, flat_new = _flatten(old.get(key, {})), _flatten(new[key])
        names = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
        return f"settings ({', '.join(names[:5])})"
    if key == "files":
        was = {rel: (size, mtime) for rel, size, mtime in old.get(key, [])}
        now = {rel: (size, mtime) for rel, size, mtime in new[key]}
        changed = sorted(r for r in was.keys() & now.keys() if was[r] != now[r])
        parts = [
            f"{what}: {', '.join(names[:3])}"
            for what, names in (
                ("changed", changed),
                ("new", sorted(now.keys() - was.keys())),
                ("gone", sorted(was.keys() - now.keys())),
            )
            if names
        ]
        return f"input files ({'; '.join(parts) or 'order'})"
    if key == "eval_files":
        return "evaluation files (decontam.paths: a file changed, appeared or went)"
    return {"inputs": "input paths", "shards": "shard plan (shard_mb)"}.get(key, key)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_plan(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _check_plan(out: Path, fingerprint: dict, overwrite: bool, world: int) -> None:
    """Rank 0: a run folder belongs to one input and one set of settings; mixing two would corrupt the accounting.

    The plan lives beside the outputs, not in work/, so that a finished run without work/ (keep_work=false) still
    refuses other input instead of writing part of its shards over the old ones. It also records the world size,
    which the other ranks check before they touch anything (`_await_plan`)."""
    path = out / "plan.json"
    old = _read_plan(path)
    if old is not None:
        old.pop("world_size", None)
        if old != fingerprint:
            if not overwrite:
                raise ValueError(
                    f"{out} holds a clean run with different {_difference(old, fingerprint)}; pass --overwrite to "
                    "start over or use another run_dir"
                )
            _clear(out)
    elif overwrite or any((out / name).exists() for name in OUTPUTS):
        _clear(out)  # outputs without a plan: a clearing that was killed; nothing in them can be trusted
    atomic_write_text(path, json.dumps({**fingerprint, "world_size": world}, ensure_ascii=False))


def _await_plan(out: Path, fingerprint: dict, rank: int, world: int, timeout: float) -> None:
    """Ranks > 0 start only once rank 0 has written (and, if asked to, cleared the folder for) the same plan with the
    same world size: a rank that started with other input, settings or world size would process shards twice or
    never, so it waits and then fails, naming the difference."""
    path, deadline, told = out / "plan.json", time.monotonic() + timeout, False
    while True:
        plan = _read_plan(path)
        if plan is not None:
            their_world = plan.pop("world_size", None)
            if plan == fingerprint and their_world == world:
                return
            why = (
                f"different {_difference(plan, fingerprint)}"
                if plan != fingerprint
                else f"world_size {their_world}, this rank {world}"
            )
        else:
            why = "no plan yet"
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0's plan in {out} does not match this rank's ({why})")
        if not told:
            print(f"rank {rank}: waiting for rank 0 to write the plan for this run ({why})", flush=True)
            told = True
        time.sleep(0.5)


def _wait_for(paths: list[Path], what: str, timeout: float, world: int, before: str) -> None:
    """Wait for other ranks' markers; on one machine nobody else will write them, so say which step to run."""
    deadline, told = time.monotonic() + timeout, False
    while missing := [p for p in paths if not p.exists()]:
        if world == 1:
            raise ValueError(
                f"clean: {what} is not finished ({len(missing)} of {len(paths)} parts missing, e.g. {missing[0]}); "
                f"run --step {before} (or --step all) first"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}: {len(missing)} missing, e.g. {missing[0]}")
        if not told:
            print(f"waiting for other ranks to finish {what} ({len(missing)} of {len(paths)} pending)", flush=True)
            told = True
        time.sleep(0.5)


def _own_outputs_removed(files: list, run_dir: str) -> list:
    """Input files minus what this stage writes (an input folder that holds the run_dir must not read it back:
    the next run would see changed input and refuse to continue)."""
    out = (Path(run_dir) / "clean").resolve()
    ledger = (Path(run_dir) / "ledger.jsonl").resolve()
    kept = [f for f in files if f.path.resolve() != ledger and not f.path.resolve().is_relative_to(out)]
    if not kept:
        raise ValueError(f"input: every input file is inside this stage's own output folder {out}")
    if len(kept) < len(files):
        print(f"clean: not reading {len(files) - len(kept)} files under {out} (this stage's own output)")
    seen: dict[str, int] = {}
    for f in kept:
        seen[f.rel] = seen.get(f.rel, 0) + 1
    if same := [rel for rel, n in seen.items() if n > 1]:
        print(
            f"clean: warning: {len(same)} relative paths occur under more than one input (e.g. {same[0]!r}); their "
            "records share source names and default ids. Pass the common parent folder to tell them apart."
        )
    return kept


def _remove_work(out: Path) -> None:
    """Rename work/ away first, then delete it: a kill during the delete must not leave markers without the files
    they vouch for (a re-run would then skip a step whose inputs are gone)."""
    work = out / "work"
    if work.is_dir():
        os.replace(work, out / f".work-trash-{os.getpid()}-{time.time_ns()}")
    for trash in out.glob(".work-trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


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
            futures = [pool.submit(fn, *job) for job in jobs]
            try:
                for fut in futures:
                    fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:  # fail now, not after every queued shard has run
                    fut.cancel()
                raise
    finally:
        bar.close()


def run(cfg: Config, runtime: Runtime | None = None) -> dict:
    t0 = time.perf_counter()
    rank, world = _rank_world(cfg)
    settings = cfg.settings()
    settings_json = settings.model_dump_json()
    files = _own_outputs_removed(discover(cfg.input), cfg.run_dir)
    shards = pipeline.plan_shards(files, cfg.read, shard_bytes(cfg.shard_mb, sum(f.size for f in files)))
    out = stage_dir(cfg.run_dir, "clean")
    fingerprint = pipeline.plan_fingerprint(cfg.input, files, shards, settings)
    if rank == 0:
        _check_plan(out, fingerprint, cfg.overwrite, world)
    else:
        _await_plan(out, fingerprint, rank, world, cfg.wait_timeout_s)
    (out / "work").mkdir(exist_ok=True)
    save_config(cfg, out)
    workers = cfg.workers or os.cpu_count() or 1
    scan_dir, mine = out / "work" / "scan", [i for i in range(len(shards)) if i % world == rank]
    scan_markers = [scan_dir / pipeline.part(i) / "stats.json" for i in range(len(shards))]
    if cfg.step in ("all", "scan"):
        todo = [i for i in mine if not scan_markers[i].is_file()]
        print(f"clean: {len(files)} files in {len(shards)} shards; scanning {len(todo)} (rank {rank}/{world})")
        # each job carries only its own files: the whole list, pickled once per shard, is quadratic in the corpus
        jobs = [(i, shards[i], {p.file: files[p.file] for p in shards[i]}, settings_json, out) for i in todo]
        _run_parallel(pipeline.scan_shard, jobs, workers, "scan", cfg.progress)
    dedup_marker = out / "work" / "dedup" / "stats.json"
    if cfg.step in ("all", "dedup"):
        _wait_for(scan_markers, "scanning", cfg.wait_timeout_s, world, "scan")
        if rank == 0 and not dedup_marker.is_file():
            print("clean: deduplicating (exact, MinHash LSH, boilerplate and repeated lines)", flush=True)
            pipeline.dedup_all(len(shards), settings_json, out)
        elif rank != 0 and cfg.step == "dedup":
            print(f"clean: deduplication is rank 0's step; nothing to do on rank {rank}")
    write_markers = [out / "work" / "write" / f"{pipeline.part(i)}.json" for i in range(len(shards))]
    if cfg.step in ("all", "write"):
        _wait_for([dedup_marker], "deduplication", cfg.wait_timeout_s, world, "dedup")
        counts = [json.loads(m.read_text("utf-8"))["candidates"] for m in scan_markers]
        offsets = [0, *itertools.accumulate(counts)]
        todo = [i for i in mine if not write_markers[i].is_file()]
        jobs = [(i, settings_json, out, offsets[i]) for i in todo]
        _run_parallel(pipeline.write_shard, jobs, workers, "write", cfg.progress)
    stats: dict = {}
    if cfg.step == "report" and rank != 0:
        print(f"clean: the report is rank 0's step; nothing to do on rank {rank}")
    if cfg.step in ("all", "report") and rank == 0:
        _wait_for(write_markers, "writing", cfg.wait_timeout_s, world, "write")
        for sub in ("data", "rejects", "quarantine", "work"):
            clean_io.remove_stale_tmp(out / sub)  # every shard is done: nobody writes there now
        stats = report.aggregate(out, len(shards), files)
        stats.update(seconds=round(time.perf_counter() - t0, 2), shards=len(shards), workers=workers)
        stats["docs_per_s"] = round(stats["records"]["in"] / max(stats["seconds"], 1e-9), 1)
        write_json(out / "stats.json", stats)
        report.render(out, stats)
        if not cfg.output.keep_work:
            _remove_work(out)
        append_ledger(cfg.run_dir, "clean", "ok", {k: stats[k] for k in ("files", "records", "seconds")})
        print(report.summary(stats, out))
    return stats
