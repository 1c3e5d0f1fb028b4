"""`gptforge report --run_dir DIR`: one page for a whole run, as report.md and a self-contained report.html.

A thin stage over `gptforge.report.build_report`: it reads what the other stages left in the run directory (the
ledger, stats, metrics, plots, reports) and writes under `<run_dir>/report/` (or `--out`): report.md (images linked
relatively), report.html (one file with CSS and images inline: it can be mailed and opened offline) and the loss
plots it draws. Missing stages are left out; a malformed file is a warning on the page, not a failure. It trains
nothing, needs no torch, and can be run again at any time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from gptforge.artifacts import save_config
from gptforge.report import build_report

if TYPE_CHECKING:  # gptforge.runtime imports torch, which a report never needs
    from gptforge.runtime import Runtime

NEEDS_TORCH = False


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(..., description="Run directory to report on (holds ledger.jsonl and the stage folders).")
    out: str = Field("", description="Output folder; empty = <run_dir>/report/.")


def run(cfg: Config, runtime: Runtime | None = None) -> dict:
    result = build_report(Path(cfg.run_dir), Path(cfg.out) if cfg.out else None)
    save_config(cfg, result["out_dir"])
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"report: {result['md']}\nreport: {result['html']}")
    return result
