"""One lean training loop for pretraining and fine-tuning.

The loop is visible in `Trainer.fit`: draw micro-batches, accumulate gradients (no DDP sync until the last one),
clip, refuse non-finite steps, step AdamW at the scheduled LR, and call two hooks (evaluate, save). What differs
between stages (data, loss, metric to watch, a compiled optimizer step) comes in as parameters, never as a fork of
this file.

Loop state is a small dataclass that goes into the checkpoint with the optimizer, the data cursor and the RNG states;
together with the pure LR schedule that makes a resumed run bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from gptforge.runtime import Runtime, fault, fault_seconds
from gptforge.train.optim import lr_at, set_lr

Batch = Any
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class TrainConfig(BaseModel):
    """Optimization and loop settings shared by every training stage."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(1000, gt=0, description="Optimizer steps to run.")
    micro_batch_size: int = Field(
        16, ge=0, description="Sequences per forward pass per process; 0 = the largest that fits in memory."
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int = Field(
        0, ge=0, description="Sequences per optimizer step over all processes; sets grad_accum. 0 = not used."
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    eval_every: int = Field(100, gt=0, description="Steps between validation passes.")
    eval_batches: int = Field(20, ge=0, description="Validation micro-batches per pass; 0 means the whole split.")
    save_every: int = Field(200, gt=0, description="Steps between checkpoints (one is always saved at the end).")
    keep_last: int = Field(3, ge=1, description="Committed checkpoints kept (plus the best one).")
    early_stop_patience: int = Field(0, ge=0, description="Stop after this many evals without improvement; 0 = off.")
    early_stop_min_delta: float = Field(0.0, ge=0, description="Improvement smaller than this does not count.")
    max_nonfinite: int = Field(5, gt=0, description="Stop with an error after this many non-finite steps in a row.")
    log_every: int = Field(10, gt=0, description="Steps between metrics lines.")


@dataclass
class LoopState:
    step: int = 0  # optimizer steps attempted (skipped non-finite steps included)
    tokens: int = 0
    best_val: float = math.inf
    evals_since_best: int = 0
    nonfinite_in_a_row: int = 0
    skipped_total: int = 0


class NonFiniteError(RuntimeError):
    pass


def _fault_nan(step: int) -> bool:
    """GPTFORGE_FAULT=nan_loss@step=37 or nan_loss@steps=30-40 turns that step's loss into NaN (reliability tests)."""
    m = re.fullmatch(r"steps?=(\d+)(?:-(\d+))?", fault("nan_loss") or "")
    return bool(m) and int(m.group(1)) <= step <= int(m.group(2) or m.group(1))


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        runtime: Runtime,
        next_batch: Callable[[], Batch],
        loss_fn: LossFn,
        tokens_per_batch: Callable[[Batch], int],
        evaluate: Callable[[LoopState], dict[str, float]] | None = None,
        save: Callable[[LoopState, bool], None] | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
        monitor: str = "val_loss",
        higher_is_better: bool = False,
        state: LoopState | None = None,
        progress: bool = True,
        step_fn: Callable[[], Any] | None = None,
    ) -> None:
        self.model, self.opt, self.cfg, self.rt = model, optimizer, cfg, runtime
        # The optimizer step: `optimizer.step`, or a compiled one (gptforge.train.optim.compiled_step).
        self.step_fn = step_fn or optimizer.step
        self.next_batch, self.loss_fn, self.tokens_per_batch = next_batch, loss_fn, tokens_per_batch
        self.evaluate, self.save, self.log = evaluate, save, log or (lambda r: None)
        self.monitor, self.higher_is_better = monitor, higher_is_better
        self.state = state or LoopState(best_val=-math.inf if higher_is_better else math.inf)
        self.progress = progress and runtime.is_main
        self.stop_reason = ""
        self.last_eval: dict[str, float] = {}

    def _micro_step(self, batch: Batch, last: bool) -> torch.Tensor:
        # DDP all-reduces gradients on every backward unless told not to; only the last micro-step needs it.
        # FSDP2 (reduce-scatter) takes the same decision through a flag.
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
        sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            with self.rt.autocast():
                loss = self.loss_fn(self.model, batch)
            if _fault_nan(self.state.step):
                loss = loss * float("nan")
            (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def train_step(self) -> dict[str, float]:
        cfg, st = self.cfg, self.state
        lr = lr_at(st.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.decay, cfg.min_lr_ratio)
        set_lr(self.opt, lr)  # in place where the LR is a tensor (compiled step)
        loss_sum = torch.zeros((), device=self.rt.device)
        tokens = 0
        for i in range(cfg.grad_accum):
            batch = self.next_batch()
            loss_sum += self._micro_step(batch, last=i == cfg.grad_accum - 1).float()
            tokens += self.tokens_per_batch(batch)
        loss = loss_sum / cfg.grad_accum
        if self.rt.distributed:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the shards
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.step_fn()
            st.nonfinite_in_a_row = 0
        else:
            # The step never reaches the optimizer: no moment update, no weight change.
            st.nonfinite_in_a_row += 1
            st.skipped_total += 1
        self.opt.zero_grad(set_to_none=True)
        # GPTFORGE_FAULT=step_sleep=SECONDS slows every step, so a kill test lands mid-run on any hardware.
        if pause := fault_seconds("step_sleep"):
            time.sleep(pause)
        st.step += 1
        st.tokens += tokens * self.rt.world_size
        return {
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "finite": finite,
            "tokens": tokens * self.rt.world_size,
        }

    def _run_eval(self) -> tuple[bool, bool]:
        """Evaluate and track the best value; return (stop by early stopping, improved)."""
        st, cfg = self.state, self.cfg
        metrics = self.evaluate(st)
        self.last_eval = metrics
        if self.monitor not in metrics:
            raise ValueError(f"cannot monitor '{self.monitor}': the evaluation reports {', '.join(sorted(metrics))}")
        value = metrics[self.monitor]
        if self.higher_is_better:  # accuracy, F1: bigger is better
            improved = value > st.best_val + cfg.early_stop_min_delta
        else:
            improved = value < st.best_val - cfg.early_stop_min_delta
        if improved:
            st.best_val, st.evals_since_best = value, 0
        else:
            st.evals_since_best += 1
        self.log({"step": st.step, **metrics, "best": improved})
        if cfg.early_stop_patience and st.evals_since_best >= cfg.early_stop_patience:
            self.stop_reason = f"early stop: {self.monitor} did not improve for {st.evals_since_best} evals"
            return True, improved
        return False, improved

    def _on_nonfinite(self, out: dict[str, float], bar) -> None:
        st = self.state
        self.log(
            {"step": st.step, "skipped": "non-finite loss or gradient", "loss": None, "grad_norm": out["grad_norm"]}
        )
        if bar:
            bar.write(f"step {st.step}: non-finite loss/gradient, step skipped ({st.nonfinite_in_a_row} in a row)")
        if st.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            if bar:
                bar.close()
            raise NonFiniteError(
                f"{st.nonfinite_in_a_row} non-finite steps in a row at step {st.step}; stopping. "
                "The last good checkpoint is intact; lower train.lr or check the data."
            )

    def fit(self) -> LoopState:
        cfg, st = self.cfg, self.state
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=st.step, desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        t_window, tok_window, loss_window = time.perf_counter(), 0, []
        while st.step < cfg.max_steps:
            out = self.train_step()
            tok_window += out["tokens"]
            if out["finite"]:
                loss_window.append(out["loss"])
            else:
                self._on_nonfinite(out, bar)
            if bar:
                bar.update(1)
            if st.step % cfg.log_every == 0 or st.step == cfg.max_steps:
                dt = time.perf_counter() - t_window
                tok_s = tok_window / dt if dt > 0 else 0.0
                if loss_window:
                    # The logged loss is the mean over the steps since the last line: a single step's loss is noisy.
                    loss = sum(loss_window) / len(loss_window)
                    keys = ("lr", "grad_norm")
                    rec = {"step": st.step, "loss": loss, **{k: out[k] for k in keys}, "tokens": st.tokens}
                    self.log({**rec, "tok_s": tok_s})
                    if bar:
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{out['lr']:.1e}", tok_s=f"{tok_s:,.0f}")
                t_window, tok_window, loss_window = time.perf_counter(), 0, []
            stop = improved = False
            paused = time.perf_counter()  # evaluation and saving are not training: kept out of tokens/s (and MFU)
            if self.evaluate and (st.step % cfg.eval_every == 0 or st.step == cfg.max_steps):
                self.model.eval()
                stop, improved = self._run_eval()
                self.model.train()
                if bar:
                    shown = "  ".join(f"{k}={v:.4f}" for k, v in self.last_eval.items())
                    bar.write(f"step {st.step}: {shown}" + ("  (best so far)" if improved else ""))
            # One save per step at most: periodic, at the end, on early stop, or to keep a new best.
            if self.save and (st.step % cfg.save_every == 0 or st.step == cfg.max_steps or stop or improved):
                self.save(st, improved)
            t_window += time.perf_counter() - paused
            if stop:
                break
        if bar:
            bar.close()
        return st
