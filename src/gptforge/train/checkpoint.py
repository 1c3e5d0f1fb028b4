"""Crash-consistent, self-describing checkpoints.

Layout of one checkpoint, `<dir>/step-00001200/`:
    model.safetensors   weights (tied tensors de-duplicated by safetensors' save_model)
    trainer.pt          optimizer, loop state, data-sampler cursor: tensors and primitives only (weights_only load)
    rng_rank{r}.pt      every global RNG state of rank r (dropout masks depend on them)
    meta.json           model config, stage config, step, tokenizer hash, world size
    tokenizer.json      so a checkpoint alone is enough to generate
    manifest.json       sha256 of every file above: written last, it is the commit marker

A checkpoint is written in `.tmp-step-*`, fsynced and renamed. A folder without a manifest is never selected and is
garbage-collected by the next save; retention only deletes older committed checkpoints after the new one is
committed, and never the one `best.json` points to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from gptforge.artifacts import fsync_dir, sha256_file, write_json
from gptforge.runtime import Runtime, fault_seconds, seed_everything, set_rng_state

MANIFEST = "manifest.json"
# The data-identity key of what one optimizer step reads, not how it is split into processes and micro-batches (see
# gptforge.data.sampler): a checkpoint resumes at another world size, DDP or FSDP, as long as it is the same.
STEP_BATCH = "sequences per optimizer step"
STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the run; the message says which and why."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def committed(folder: str | Path) -> list[Path]:
    """Committed checkpoints (those with a manifest), oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := STEP_RE.match(d.name)) and (d / MANIFEST).is_file()]
    return [d for _, d in sorted(found)]


def latest(folder: str | Path) -> Path | None:
    c = committed(folder)
    return c[-1] if c else None


def best(folder: str | Path) -> Path | None:
    f = Path(folder) / "best.json"
    if f.is_file():
        d = Path(folder) / json.loads(f.read_text())["checkpoint"]
        if (d / MANIFEST).is_file():
            return d
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a stage/checkpoints folder (best, else newest committed checkpoint inside it)."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            found = best(root) or latest(root)
            if found:
                return found
    raise CheckpointError(f"no committed checkpoint found at {p}")


def verify(ckpt: Path) -> dict[str, str]:
    """Check every file against the manifest; a truncated or altered file is an error naming it."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {name}")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {ckpt}: {name} does not match its manifest hash (corrupt)")
    return manifest["files"]


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save(
    folder: str | Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    rng: dict[str, Any],
    runtime: Runtime,
    tokenizer_file: str | Path | None = None,
    keep_last: int = 3,
) -> Path:
    """Collective across ranks: every rank writes its RNG file, rank 0 writes the rest and commits."""
    root = Path(folder)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if runtime.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir()
    runtime.barrier()
    torch.save(rng, tmp / f"rng_rank{runtime.rank}.pt")
    _fsync_file(tmp / f"rng_rank{runtime.rank}.pt")
    runtime.barrier()
    if runtime.is_main:
        for name, p in model.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise CheckpointError(f"refusing to save step {step}: tensor '{name}' has non-finite values")
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        write_json(tmp / "meta.json", {**meta, "step": step, "world_size": runtime.world_size, "time": time.time()})
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        for f in tmp.iterdir():
            _fsync_file(f)
        # GPTFORGE_FAULT=save_sleep=SECONDS: the window between data files and commit that a crash test aims at.
        if pause := fault_seconds("save_sleep"):
            time.sleep(pause)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        write_json(tmp / MANIFEST, {"step": step, "files": files})
        fsync_dir(tmp)
        old = root / f".old-{final.name}"
        if final.exists():  # re-saving a step: move the committed copy aside only once its successor is complete
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _retain(root, keep_last)
    runtime.barrier()
    return final


def _retain(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    keep = set(committed(root)[-keep_last:])
    if b := best(root):
        keep.add(b)
    for d in committed(root):
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)


def mark_best(root: str | Path, ckpt: Path, metrics: dict[str, Any]) -> None:
    write_json(Path(root) / "best.json", {"checkpoint": ckpt.name, **metrics})


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "meta.json").read_text())


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: {str(e).splitlines()[0]}") from None
    except Exception as e:  # safetensors' own SafetensorError (a malformed header or truncated data) is no RuntimeError
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors is not a valid safetensors file ({e})") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: missing {missing}, unexpected {unexpected}")


def check_finite(model: torch.nn.Module, where: str) -> None:
    """Refuse a model holding NaN or inf in any floating tensor (parameters and buffers), naming the first one."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor '{name}' has non-finite values (NaN or inf)")


def load_trainer_state(ckpt: Path, rank: int, rng: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer state, this rank's RNG state, or None when rng=False). weights_only: nothing in a checkpoint can run
    code."""
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng and not rng_file.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no RNG state for rank {rank} (saved at another world size)")
    return _safe_load(ckpt / "trainer.pt"), _safe_load(rng_file) if rng else None


def restore_trainer_state(ckpt: Path, runtime: Runtime, seed: int) -> dict[str, Any]:
    """The trainer state of `ckpt`, with this rank's RNG restored: exactly when the world size is the one it was
    saved at; otherwise the data of every step is the same, but per-rank random streams (dropout) cannot be carried
    over, so each rank gets a fresh one derived from the seed, the step and its rank. Prints what it did on rank 0."""
    saved_world = read_meta(ckpt).get("world_size", 1)
    same = saved_world == runtime.world_size
    sd, rng = load_trainer_state(ckpt, runtime.rank, rng=same)
    step = sd["loop"]["step"]
    if rng is not None:
        set_rng_state(rng)
    else:
        seed_everything(seed + 1_000_003 * step + runtime.rank)
    if runtime.is_main:
        print(f"resuming from {ckpt} (step {step})")
        if not same:
            print(
                f"  saved by {saved_world} process(es), resumed by {runtime.world_size}: the same data per step; "
                "dropout random streams re-seeded"
            )
    return sd


def step_batch_hint(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How to resume with another number of processes when the data identities differ in STEP_BATCH."""
    if (n := saved.get(STEP_BATCH)) and n != current.get(STEP_BATCH):
        return [
            f"to resume with another number of processes keep micro_batch_size x grad_accum x processes = {n} "
            f"(e.g. --train.global_batch_size={n})"
        ]
    return []


def _safe_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a payload that is more than tensors and primitives, or a bad file
        raise CheckpointError(
            f"{path} refused: it is not a plain tensor file that loads without running code ({str(e).splitlines()[0]})"
        ) from None


def diff_fields(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """Names and values of fields that differ, e.g. ['model.n_layer: checkpoint 4, config 6']."""
    out = []
    for k in sorted(set(saved) | set(current)):
        if saved.get(k) != current.get(k):
            out.append(f"{prefix}{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}")
    return out
