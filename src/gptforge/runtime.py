"""Where the code runs: device, autocast dtype, rank and world size, seeding.

The only module that initializes torch.distributed. A `Runtime` is built once by the CLI and passed into stages,
so nothing reads global device state at import time (torchtitan's `train.py`).
"""

from __future__ import annotations

import ast
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from gptforge.faults import fault, fault_seconds  # noqa: F401  (re-exported for the trainer)


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast compute dtype; float32 means autocast off
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    why: str = ""  # how `auto` device/dtype were resolved, for the log

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def describe(self) -> str:
        s = f"device={self.device} dtype={str(self.dtype).removeprefix('torch.')}"
        if self.distributed:
            s += f" rank={self.rank}/{self.world_size}"
        return f"{s} ({self.why})" if self.why else s


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX-512 BF16 / AMX); emulated bf16 on other CPUs is slower
    than fp32, so autocast would be a pessimization there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}' (auto, cpu, cuda, cuda:N or mps)") from None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            # Native bf16 only (Ampere and later): emulated bf16 is slow, and fp16 would need a GradScaler.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got '{name}'")
    return table[name]


def build_runtime(device: str = "auto", dtype: str = "auto", threads: int = 0) -> Runtime:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and set up the process group when launched
    with more than one process: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        # Always an explicit index, made current: CUDA-graph capture, the saved CUDA RNG state and any tensor created
        # as plain "cuda" follow the current device, which is otherwise 0 (in every new thread too).
        dev = torch.device("cuda", local_rank if world > 1 else dev.index or 0)
        torch.cuda.set_device(dev)
    if threads > 0:
        torch.set_num_threads(threads)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    dt = pick_dtype(dtype, dev)
    why = []
    if device == "auto":
        why.append(f"device auto: {'CUDA' if dev.type == 'cuda' else 'MPS' if dev.type == 'mps' else 'no CUDA or MPS'}")
    if dtype == "auto":
        native = "native bf16" if dt == torch.bfloat16 else "no native bf16, fp32"
        why.append(f"dtype auto: {native} on this {'GPU' if dev.type == 'cuda' else dev.type.upper()}")
    return Runtime(dev, dt, rank=rank, local_rank=local_rank, world_size=world, why="; ".join(why))


# Dense bf16 tensor-core peaks in FLOP/s from the vendors' data sheets (without sparsity), matched against the CUDA
# device name; the first matching key wins, so the more specific names come first.
BF16_PEAK_FLOPS = {
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(bf16 peak FLOP/s of one device, its name); None where no peak is known (CPUs, unlisted GPUs): MFU is then not
    reported rather than guessed."""
    if device.type != "cuda":
        return None, device.type
    name = torch.cuda.get_device_name(device)
    for key, flops in BF16_PEAK_FLOPS.items():
        if key in name:
            return flops, name
    return None, name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All global RNG states as tensors/primitives, so `torch.load(weights_only=True)` can read them back."""
    state = {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
    }
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state["numpy"] = {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's generator only (build_runtime makes the run's device current): a state per visible GPU
        # would not restore on a machine that shows fewer GPUs.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    nps = state["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list | tuple):  # older checkpoints: one state per visible GPU, by index
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
