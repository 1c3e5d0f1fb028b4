"""Shared benchmark plumbing: CPU-contention measurement, machine facts and README table updates."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import gptforge

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------------------------
# CPU contention. On a shared host another tenant (invisible to `ps`) can take a core; with 2 OpenMP threads spinning
# at barriers, losing one core makes every step several times slower. The load is measured, not guessed: machine-wide
# busy ticks from /proc/stat minus this process's own ticks.


def cpu_snapshot() -> tuple[int, int, int] | None:
    """(machine busy ticks, machine total ticks, this process's ticks), or None where /proc is missing."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals)  # user nice system idle iowait irq softirq steal
    return total - idle, total, int(own[11]) + int(own[12])  # utime + stime: fields 14 and 15 of /proc/PID/stat


def foreign_share(a: tuple[int, int, int] | None, b: tuple[int, int, int] | None) -> float | None:
    """Share of all CPU time between two snapshots that went to other processes (0 = machine was ours)."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1]))


def wait_for_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Sample one second at a time until other processes use under `threshold` of the CPUs, or give up after
    `max_wait` seconds. Returns the seconds waited. Starting every run on a quiet machine keeps contention from
    landing systematically on one contender."""
    t0 = time.perf_counter()
    told = False
    while True:
        a = cpu_snapshot()
        time.sleep(1.0)
        share = foreign_share(a, cpu_snapshot())
        waited = time.perf_counter() - t0
        if share is None or share < threshold or waited >= max_wait:
            if told and share is not None and share >= threshold:
                print(f"    still busy after {waited:.0f}s ({share:.0%}); running anyway", flush=True)
            return waited
        if not told:
            print(f"    other processes use {share:.0%} of the CPUs; waiting up to {max_wait:.0f}s", flush=True)
            told = True


# --------------------------------------------------------------------------------------------------------------------
# Reporting


def machine_facts() -> dict:
    cpu, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())

    def git_out(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    git = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        # "dirty" = uncommitted changes under src/: the numbers then describe code that no commit holds.
        git = {"commit": git_out("rev-parse", "HEAD"), "dirty_src": bool(git_out("status", "--porcelain", "src"))}
    import transformers

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "cpu_bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"}),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gptforge": gptforge.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "git": git,
    }


def fmt_share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def update_readme(path: Path, md: str, begin: str, end: str) -> bool:
    """Replace the text between the `begin` and `end` markers of `path` with `md`; False when there are none."""
    if not path.is_file():
        return False
    text = path.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{md}\n{end}{tail}")
    return True


def publish(res: dict, md: str, out: Path, name: str, readme: bool = True) -> None:
    """Print the table, write `out` (JSON) and the .md beside it, and, when `out` is in bench/results/, replace the
    README table between `<!-- name:begin -->` and `<!-- name:end -->`."""
    print(md)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    if readme and out.resolve().parent == (ROOT / "bench" / "results").resolve():
        update_readme(ROOT / "README.md", md, f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
