"""Weight quantization by module swapping: int8 (weight-only or dynamic) and int4 group-wise weight-only.

Selected `nn.Linear` modules (and the token embedding) are replaced by modules that store integer weights plus
scales; the model file never changes (house rule 8). What is stored is portable and kernel-independent, so a
checkpoint is ordinary safetensors that any machine can reload; the kernel-specific packing is rebuilt lazily on
first use on the device at hand.

Formats (w is one (N, K) weight, N output rows, K inputs):
* int8: symmetric per output row. `qweight` int8 (N, K) in [-127, 127], `scale` fp32 (N,): w ~ qweight * scale.
  - `int8` (weight-only) multiplies bf16 activations by the int8 weight (`torch._weight_int8pack_mm`): the weight
    stays 4x smaller in memory, which is what a memory-bound decode step pays for.
  - `int8_dynamic` also quantizes each activation row to int8 at run time and runs an int8 x int8 GEMM (fbgemm's
    `quantized::linear_dynamic`, the kernel behind `torch.ao.quantization.quantize_dynamic`): on CPU the fastest
    option measured (deps.md section 8), at a little more error. That API is deprecated upstream, so when it is missing
    the module falls back to the weight-only kernel, with the same stored weights.
* int4: asymmetric per group of `group_size` inputs. `qweight` uint8 (N, K/2), two 4-bit values per byte (even k in
  the low nibble), `scale_zero` bf16 (K/G, N, 2): w ~ (q - 8) * scale + zero (the tinygemm convention of torch's
  `_weight_int4pack_mm_for_cpu`, so the scales feed it as they are; the 4-bit codes are repacked into its
  CPU-specific layout once, on first use). Rows are padded to a multiple of 16 for that
  kernel (its requirement); padding rows are zeros and are sliced off the output.
* The token embedding is quantized with the same format; when it is tied to the LM head both read the one quantized
  table (a `QuantEmbedding` holds the head module), so the tie survives and is stored once.

Trade-offs: per-row int8 and group-wise int4 with round-to-nearest are calibration-free (no GPTQ/AWQ), which keeps
quantization to a second and the result deterministic; the group size trades accuracy for size. The kernels used are
torch's own CPU kernels (underscore APIs); tests pin their numerics against a plain dequantize-and-matmul reference.
On CUDA the same modules run (the kernels dispatch there too); torchao is not required.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.compress.select import select_modules

Scheme = Literal["int8", "int8_dynamic", "int4"]
SCHEMES = ("int8", "int8_dynamic", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel accepts


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """Activation dtype for torch's int8/int4 weight-only CPU kernels: bf16, their only vectorized input type there
    (fp32 inputs take a scalar path 30-150x slower, measured in bench/compress.py). The kernels accumulate in fp32;
    the cost is bf16 rounding of the activations, ~0.4% relative, well below the weights' own quantization error."""
    return torch.bfloat16 if x.device.type == "cpu" else x.dtype


class QuantLinear(nn.Module):
    """Base of the quantized linear layers: holds the optional float bias; subclasses store the weight."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel_cache: dict[Any, Any] = {}
        # A reload writes new integers into the buffers: whatever was packed from the old ones is stale.
        self.register_load_state_dict_post_hook(lambda module, _: module._kernel_cache.clear())

    def _apply(self, fn, recurse=True):
        self._kernel_cache = {}  # .to(device / dtype) invalidates packed weights
        return super()._apply(fn, recurse)

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dynamic: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.dynamic = dynamic
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def from_float(cls, linear: nn.Linear, dynamic: bool = False) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dynamic)
        q, scale = quantize_int8(linear.weight.detach())
        m.qweight.copy_(q)
        m.scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def _dynamic_packed(self):
        """fbgemm's packed per-channel int8 weight, or None where that deprecated path is unavailable."""
        if "dyn" not in self._kernel_cache:
            packed = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the quantized-tensor deprecation notice, once per layer
                    zeros = torch.zeros(self.out_features, dtype=torch.long)
                    scale = self.scale.double().cpu()
                    wq = torch._make_per_channel_quantized_tensor(self.qweight.cpu(), scale, zeros, 0)
                    bias = None if self.bias is None else self.bias.float().cpu()
                    packed = torch.ops.quantized.linear_prepack(wq, bias)
            except (RuntimeError, AttributeError, NotImplementedError):
                packed = None
            self._kernel_cache["dyn"] = packed
        return self._kernel_cache["dyn"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # the kernels take 2-D inputs
        if self.dynamic and x.device.type == "cpu" and (packed := self._dynamic_packed()) is not None:
            # reduce_range=True: 7-bit activations, avoiding int16 accumulation overflow on CPUs without VNNI
            # (what quantize_dynamic does on x86).
            y = torch.ops.quantized.linear_dynamic(x2.float(), packed, True).to(x.dtype)
        else:
            # bf16 activations: torch's CPU kernel has a vectorized path for bf16 only; fp32 input is ~30x slower.
            kdt = _kernel_dtype(x)
            scale = self._kernel_cache.get(("scale", kdt))
            if scale is None:
                scale = self._kernel_cache[("scale", kdt)] = self.scale.to(kdt)
            y = torch._weight_int8pack_mm(x2.to(kdt).contiguous(), self.qweight, scale).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def embed_rows(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight[idx].to(dtype) * self.scale[idx].to(dtype)[..., None]).to(dtype)


class Int4Linear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64) -> None:
        super().__init__(in_features, out_features, bias)
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} (torch's int4 kernel), got {group_size}")
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        groups = in_features // group_size
        self.register_buffer("scale_zero", torch.zeros(groups, out_features, 2, dtype=torch.bfloat16))

    @classmethod
    def from_float(cls, linear: nn.Linear | nn.Embedding, group_size: int = 64) -> Int4Linear:
        w = linear.weight.detach()
        bias = getattr(linear, "bias", None)
        m = cls(w.shape[1], w.shape[0], bias is not None, group_size)
        q, scale_zero = quantize_int4(w, group_size)
        m.qweight.copy_(q)
        m.scale_zero.copy_(scale_zero)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m.to(w.device)

    def _codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """4-bit codes (N, K) int32 (or those of `rows`) unpacked from the portable byte layout."""
        packed = self.qweight if rows is None else self.qweight[rows]
        low, high = (packed & 0x0F).to(torch.int32), (packed >> 4).to(torch.int32)
        return torch.stack((low, high), dim=-1).flatten(-2)

    def dequantize(self) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        sz = self.scale_zero.float().permute(1, 0, 2)  # (N, K/G, 2)
        q = self._codes().view(n, k // g, g).float()
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(n, k)

    def _packed(self, dtype: torch.dtype):
        """(packed weight, scale_zero in the activation dtype, padded rows) for torch's int4 CPU kernel."""
        key = ("int4", dtype)
        if key not in self._kernel_cache:
            pad = -self.out_features % 16  # the kernel needs N divisible by 16
            codes = F.pad(self._codes(), (0, 0, 0, pad), value=8)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = F.pad(self.scale_zero, (0, 0, 0, pad)).to(dtype)  # padding rows: scale 0, zero 0 -> weight 0
            self._kernel_cache = {key: (packed, sz, pad)}
        return self._kernel_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x.device.type == "cpu":
            kdt = _kernel_dtype(x)
            packed, sz, _ = self._packed(kdt)
            y = torch._weight_int4pack_mm_for_cpu(x2.to(kdt), packed, self.group_size, sz)[:, : self.out_features]
            y = y.to(x.dtype)
        else:
            # No fused kernel wired up here: dequantize once per device/dtype (memory of a float copy).
            key = ("dense", x.device, x.dtype)
            if key not in self._kernel_cache:
                self._kernel_cache = {key: self.dequantize().to(x.device, x.dtype)}
            y = x2 @ self._kernel_cache[key].t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def embed_rows(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        g = self.group_size
        flat = idx.reshape(-1)
        sz = self.scale_zero[:, flat].float().permute(1, 0, 2)  # (R, K/G, 2): only the rows looked up
        q = self._codes(flat).view(len(flat), -1, g).float()
        rows = ((q - 8) * sz[..., :1] + sz[..., 1:]).view(len(flat), self.in_features)
        return rows.to(dtype).view(*idx.shape, self.in_features)


class QuantEmbedding(nn.Module):
    """Token embedding read from a quantized (V, C) table: the LM head's when tied, its own otherwise."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.out_dtype = dtype  # what nn.Embedding would have returned (the model's float dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table.embed_rows(idx, self.out_dtype)

    def _apply(self, fn, recurse=True):
        # Follow .to(dtype) like a float embedding would: probe the conversion on a float tensor.
        self.out_dtype = fn(torch.zeros((), dtype=self.out_dtype)).dtype
        return super()._apply(fn, recurse)


# --- quantization of one tensor -------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 codes in [-127, 127] and per-row fp32 scales (symmetric, round to nearest)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed uint8 (N, K/2) and bf16 scale_zero (K/G, N, 2), asymmetric per group.

    The scale and zero are rounded to bf16 *before* the codes are chosen, so the codes are optimal for the stored
    (not the ideal) scale."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input width {k} is not a multiple of group_size {group_size}")
    wg = w.float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, K/G)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()  # w = (q - 8) * scale + zero, so q = 0 decodes to lo
    q = torch.round((wg - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8).view(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    scale_zero = torch.stack((scale, zero), dim=-1).permute(1, 0, 2).contiguous().to(torch.bfloat16)
    return packed, scale_zero


# --- whole models -------------------------------------------------------------------------------------------------


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _make(module: nn.Module, scheme: str, group_size: int, empty: bool) -> QuantLinear:
    w = module.weight
    out_f, in_f = w.shape
    bias = getattr(module, "bias", None) is not None
    if scheme == "int4":
        return Int4Linear(in_f, out_f, bias, group_size) if empty else Int4Linear.from_float(module, group_size)
    dynamic = scheme == "int8_dynamic"
    if empty:
        return Int8Linear(in_f, out_f, bias, dynamic)
    if isinstance(module, nn.Embedding):
        m = Int8Linear(in_f, out_f, False, dynamic)
        q, s = quantize_int8(w.detach())
        m.qweight.copy_(q)
        m.scale.copy_(s)
        return m
    return Int8Linear.from_float(module, dynamic)


def quantize_model(
    model: nn.Module,
    scheme: Scheme,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    group_size: int = 64,
    embedding: bool = True,
) -> dict[str, Any]:
    """Swap the selected Linear layers of a GPT in place for quantized ones; returns the spec that `meta.json`
    records and `apply_quantization_spec` replays at load time.

    For a classifier (a module with a `.gpt` body) the body is quantized and names are relative to it; the
    classification head stays float (a few thousand weights that decide every prediction). The token embedding
    `wte` is quantized too when `embedding` is true; a tied LM head and embedding are quantized together (both or
    neither, following the filter's decision on `lm_head`)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} for int4, got {group_size}")
    gpt = getattr(model, "gpt", model)
    chosen = select_modules(gpt, include, exclude)
    if scheme == "int4":
        bad = [n for n, m in chosen.items() if m.in_features % group_size]
        if bad:
            raise ValueError(
                f"int4 with group_size {group_size} needs input widths divisible by it; not so for {bad[:4]} "
                "(pick a smaller --group_size or exclude those modules)"
            )
    quant_embedding = embedding and isinstance(gpt.wte, nn.Embedding)
    if gpt.config.tie_embeddings:
        quant_embedding = "lm_head" in chosen  # one tensor: quantized for both or for neither
    elif scheme == "int4" and gpt.wte.embedding_dim % group_size:
        quant_embedding = False
    spec = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None, "modules": sorted(chosen)}
    spec["embedding"] = quant_embedding
    _build(gpt, spec, from_float=True)
    return spec


def apply_quantization_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """Rebuild the quantized module structure recorded by `quantize_model` (empty buffers, ready for
    `load_state_dict`): how a saved quantized checkpoint is loaded."""
    if not isinstance(spec.get("modules"), list) or spec.get("scheme") not in SCHEMES:
        raise ValueError(f"malformed quantization spec in meta.json: {spec!r}")
    _build(getattr(model, "gpt", model), spec, from_float=False)


def _build(gpt: nn.Module, spec: dict[str, Any], from_float: bool) -> None:
    scheme, group_size = spec["scheme"], spec.get("group_size") or 64
    dtype = gpt.wte.weight.dtype
    with torch.no_grad():
        for name in spec["modules"]:
            _swap(gpt, name, _make(gpt.get_submodule(name), scheme, group_size, empty=not from_float))
        if spec.get("embedding"):
            if gpt.config.tie_embeddings:
                table = gpt.lm_head
            else:
                table = _make(gpt.wte, scheme, group_size, empty=not from_float)
            gpt.wte = QuantEmbedding(table, dtype)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized module by its float equivalent (weights = the dequantized values), in place; a tied
    head and embedding share one float tensor again. Returns the model. Used by export and for measurements."""
    gpt = getattr(model, "gpt", model)
    with torch.no_grad():
        # remove_duplicate=False: a tied head is also reachable as wte.table, and must be found under its own name.
        for name, m in list(gpt.named_modules(remove_duplicate=False)):
            if isinstance(m, QuantLinear) and name != "wte.table":
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.qweight.device)
                lin.weight.copy_(m.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
                _swap(gpt, name, lin)
        if isinstance(gpt.wte, QuantEmbedding):
            if gpt.config.tie_embeddings:
                gpt.wte = nn.Embedding(gpt.wte.num_embeddings, gpt.wte.embedding_dim)
                gpt.wte.weight = gpt.lm_head.weight
            else:
                gpt.wte = nn.Embedding.from_pretrained(gpt.wte.table.dequantize(), freeze=False)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def logical_params(model: nn.Module) -> int:
    """Parameter count of the model as if it were float: float parameters plus the weights stored as integers
    (each counted once, also when the head and the embedding share one table)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        n += p.numel()
    for m in model.modules():
        if isinstance(m, QuantLinear) and id(m) not in seen:
            seen.add(id(m))
            n += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
    return n
