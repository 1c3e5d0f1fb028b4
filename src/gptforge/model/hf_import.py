"""Load a local Hugging Face GPT-2 / Llama / Qwen2 (/ Mistral) folder into gptforge's own `GPT`.

Fine-tuning a published model with gptforge means mapping its `config.json` onto `GPTConfig` and its tensors onto our
parameter names. The mapping is *exact or refused*: every config key that changes the computation is either
represented by a `GPTConfig` flag or rejected with a message naming the key (rope scaling, sliding windows, a
head_dim that is not hidden/heads, other activations, bias layouts our flags cannot express). A model that loads
therefore computes the same logits as `transformers` does (the tests check this to 1e-4 in fp32).

Safety: only `config.json` (JSON), `tokenizer.json` (JSON) and safetensors files are read. Pickled weights
(`pytorch_model.bin`, `*.pt`, `*.ckpt`) are refused because unpickling runs arbitrary code, and nothing from the
folder is imported or executed: `auto_map` and `*.py` files are ignored (and reported in the info dict). Trade-off:
a folder whose real architecture lives in custom code is loaded as the stock architecture its `model_type` names.

Strictness: every tensor the model needs must be in the files and every other tensor is an error (first few names
listed), except the buffers `transformers` itself never loads (GPT-2's causal-mask `attn.bias`/`attn.masked_bias`,
the rotary `inv_freq`), which are listed in `info["ignored_tensors"]`. Shapes are checked against the config before
any data is read, and every tensor is checked for NaN/inf before and after the dtype cast.

The model is built on the meta device and filled tensor by tensor, so peak memory is about one model plus one tensor
and no time is spent on a random init that would be overwritten.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptforge.model.gpt import GPT, GPTConfig, rope_cache
from gptforge.tokenizer.bpe import Tokenizer

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
# Activations that are the tanh approximation of GELU, the one our GELU MLP computes. gelu_fast and
# gelu_python_tanh are the same formula written differently (transformers/activations.py).
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# transformers' class defaults for keys a hand-written config.json may omit (configuration_*.py). Shape keys need no
# defaults of ours: a wrong guess there is caught by the shape check against the file.
_EPS_DEFAULT = {"gpt2": 1e-5, "llama": 1e-6, "qwen2": 1e-6, "mistral": 1e-6}
_TIE_DEFAULT = {"gpt2": True, "llama": False, "qwen2": False, "mistral": False}
_MAX_POS_DEFAULT = {"gpt2": 1024, "llama": 2048, "qwen2": 32768, "mistral": 4096 * 32}
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "mistral": "model."}
# Buffers some checkpoints carry that transformers never loads: GPT-2's causal mask and old masked_bias constant,
# and the rotary inverse frequencies (derived from the config).
_IGNORED = {
    "gpt2": re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
}
_SHOW = 5  # how many names an error lists


class HFImportError(ValueError):
    """A Hugging Face folder that gptforge cannot load exactly (or safely); the message names the key/file/tensor."""


def _names(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def is_hf_folder(path: str | Path) -> bool:
    """True for a directory with a `config.json` that declares a `model_type` (a Hugging Face model folder)."""
    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8")) if p.is_dir() else None
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "model_type" in cfg


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The folder's `config.json` as a dict; errors name the file."""
    p = Path(folder) / "config.json"
    if not p.is_file():
        raise HFImportError(f"{p} not found: not a Hugging Face model folder")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFImportError(f"cannot read {p}: {e}") from None
    if not isinstance(cfg, dict):
        raise HFImportError(f"{p} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _require(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise HFImportError(f"config.json ({cfg.get('model_type')}) lacks the required key '{key}'")
    return cfg[key]


def _refuse(model_type: str, key: str, value: Any, why: str) -> HFImportError:
    return HFImportError(f"{model_type} config.json: {key}={value!r} is not supported: {why}")


def _rope_theta(cfg: dict[str, Any]) -> float:
    """RoPE base from either layout: transformers v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`).
    Only the plain ("default") rotary embedding is ours; any scaling changes the frequencies and is refused."""
    mt = cfg["model_type"]
    for key in ("rope_scaling", "rope_parameters"):
        rp = cfg.get(key)
        if rp is None:
            continue
        if not isinstance(rp, dict):
            raise _refuse(mt, key, rp, "expected null or an object")
        kind = rp.get("rope_type", rp.get("type", "default"))
        # A "default" entry is the identity (v5 always writes one); anything else rescales frequencies.
        if kind != "default":
            raise _refuse(mt, key, rp, "rope scaling is not implemented in gptforge's model; use an unscaled model")
        if rp.get("partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(mt, f"{key}.partial_rotary_factor", rp["partial_rotary_factor"], "only full rotary")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(mt, "partial_rotary_factor", cfg["partial_rotary_factor"], "only full rotary is supported")
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _block_size(model_type: str, key: str, native: int, cap: int | None, learned: bool) -> int:
    if cap is None:
        return native
    if cap <= 0:
        raise HFImportError(f"block_size must be > 0, got {cap}")
    if cap > native and learned:
        raise HFImportError(
            f"block_size {cap} exceeds the model's {key}={native}: learned position embeddings have no rows past it"
        )
    # Above a RoPE model's max_position_embeddings is allowed (rotary tables extend), but quality past the trained
    # context is not guaranteed.
    return cap


def _gpt2_config(cfg: dict[str, Any], cap: int | None) -> dict[str, Any]:
    act = cfg.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        why = f"gptforge's GELU MLP is the tanh form ({', '.join(TANH_GELU)})"
        raise _refuse("gpt2", "activation_function", act, why)
    if not cfg.get("scale_attn_weights", True):
        raise _refuse("gpt2", "scale_attn_weights", False, "attention is always scaled by 1/sqrt(head_dim)")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise _refuse("gpt2", "scale_attn_by_inverse_layer_idx", True, "no per-layer attention scaling")
    if cfg.get("add_cross_attention", False):
        raise _refuse("gpt2", "add_cross_attention", True, "decoder-only model, no cross-attention")
    native = int(cfg.get("n_positions") or _MAX_POS_DEFAULT["gpt2"])
    n_embd = int(_require(cfg, "n_embd"))
    return dict(
        block_size=_block_size("gpt2", "n_positions", native, cap, learned=True),
        n_layer=_require(cfg, "n_layer"),
        n_head=_require(cfg, "n_head"),
        n_embd=n_embd,
        intermediate_size=cfg.get("n_inner") or 4 * n_embd,
        norm="layernorm",
        mlp="gelu",
        pos="learned",
        bias=True,
        norm_eps=cfg.get("layer_norm_epsilon", _EPS_DEFAULT["gpt2"]),
    )


def _llama_like_config(cfg: dict[str, Any], cap: int | None) -> dict[str, Any]:
    mt = cfg["model_type"]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(mt, "hidden_act", act, "gptforge's SwiGLU MLP uses silu")
    hidden, heads = int(_require(cfg, "hidden_size")), int(_require(cfg, "num_attention_heads"))
    # An explicit head_dim that differs from hidden/heads (pruned heads, Qwen3-style shapes) maps to head_size.
    head_dim = cfg.get("head_dim")
    head_size = 0 if head_dim is None or head_dim * heads == hidden else int(head_dim)
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _refuse(mt, "layer_types", sorted(set(layer_types)), "only full (causal) attention is supported")
    bias = qkv_bias = False
    if mt == "llama":
        # Llama's attention_bias puts biases on q/k/v *and* o_proj, mlp_bias on gate/up/down. Our `bias` flag is
        # exactly both together (RMSNorm has no bias); `qkv_bias` lacks o_proj, so a single one cannot be mapped.
        attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            key = "attention_bias" if attn_bias else "mlp_bias"
            why = "gptforge biases q/k/v/o and the MLP together (bias) or q/k/v only (qkv_bias); no exact mapping"
            raise _refuse(mt, key, True, why)
        bias = attn_bias
    elif mt == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and none on o_proj or the MLP (modeling_qwen2.py)
        if cfg.get("use_sliding_window", False):
            raise _refuse(mt, "use_sliding_window", True, "sliding-window attention is not implemented")
    native = int(cfg.get("max_position_embeddings") or _MAX_POS_DEFAULT[mt])
    block_size = _block_size(mt, "max_position_embeddings", native, cap, learned=False)
    window = cfg.get("sliding_window") if mt == "mistral" else None
    if window is not None and window < block_size:
        # Mistral's window only masks keys more than `window` positions back, which never happens when every
        # sequence fits in it: then the model is exactly Llama.
        why = f"sliding-window attention is not implemented; block_size <= {window} makes it plain causal attention"
        raise _refuse(mt, "sliding_window", window, why)
    return dict(
        block_size=block_size,
        n_layer=_require(cfg, "num_hidden_layers"),
        n_head=heads,
        n_kv_head=cfg.get("num_key_value_heads") or heads,
        n_embd=hidden,
        head_size=head_size,
        intermediate_size=_require(cfg, "intermediate_size"),
        bias=bias,
        qkv_bias=qkv_bias,
        rope_theta=_rope_theta(cfg),
        norm_eps=cfg.get("rms_norm_eps", _EPS_DEFAULT[mt]),
    )


def hf_config_to_gpt(hf_config: dict[str, Any], block_size: int | None = None) -> GPTConfig:
    """Map a Hugging Face `config.json` dict to an exactly equivalent `GPTConfig`, or raise `HFImportError` naming
    the unsupported key. `block_size` caps the context (default: the model's own max positions)."""
    mt = hf_config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise HFImportError(f"config.json: model_type={mt!r} is not supported; supported: {supported}")
    arch = _gpt2_config(hf_config, block_size) if mt == "gpt2" else _llama_like_config(hf_config, block_size)
    try:
        return GPTConfig(
            vocab_size=_require(hf_config, "vocab_size"),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", _TIE_DEFAULT[mt])),
            dropout=0.0,
            **arch,
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise HFImportError(f"{mt} config.json does not map to a valid GPTConfig: {e}") from None


# --- weights ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """One tensor of the file (name without the model prefix) -> one or more of our parameters."""

    hf_name: str
    targets: tuple[str, ...]  # several = split along dim 0 (GPT-2's fused c_attn -> c_q, c_k, c_v)
    transpose: bool = False  # GPT-2's Conv1D stores (in, out); nn.Linear is (out, in)
    file_rows: int | None = None  # the file has this many rows and we keep the first ones (wpe cut to block_size)


def _specs(model: GPT, model_type: str, n_positions: int) -> list[_Spec]:
    cfg, ours = model.config, model.state_dict()
    if model_type == "gpt2":  # (file name, our names, Conv1D-transposed)
        # The file holds all n_positions rows of wpe; we keep the first block_size.
        top = [_Spec("wte.weight", ("wte.weight",)), _Spec("wpe.weight", ("wpe.weight",), file_rows=n_positions)]
        per_layer = [("ln_1", "ln_1", False), ("attn.c_attn", ("attn.c_q", "attn.c_k", "attn.c_v"), True)]
        per_layer += [("attn.c_proj", "attn.c_proj", True), ("ln_2", "ln_2", False)]
        per_layer += [("mlp.c_fc", "mlp.c_fc", True), ("mlp.c_proj", "mlp.c_proj", True)]
        layer_fmt, final = "h.{i}.", "ln_f"
    else:
        top = [_Spec("embed_tokens.weight", ("wte.weight",))]
        per_layer = [("input_layernorm", "ln_1", False), ("post_attention_layernorm", "ln_2", False)]
        per_layer += [(f"self_attn.{a}_proj", f"attn.c_{b}", False) for a, b in zip("qkvo", ("q", "k", "v", "proj"))]
        per_layer += [(f"mlp.{a}_proj", f"mlp.c_{b}", False) for a, b in (("gate", "gate"), ("up", "fc"))]
        per_layer += [("mlp.down_proj", "mlp.c_proj", False)]
        layer_fmt, final = "layers.{i}.", "norm"
    specs = list(top)
    for i in range(cfg.n_layer):
        for hf, targets, transpose in per_layer:
            targets = (targets,) if isinstance(targets, str) else targets
            pre = layer_fmt.format(i=i)
            for kind in ("weight", "bias"):  # a bias is expected exactly when our module has one
                names = tuple(f"h.{i}.{t}.{kind}" for t in targets)
                if names[0] in ours:
                    specs.append(_Spec(f"{pre}{hf}.{kind}", names, transpose and kind == "weight"))
    specs += [_Spec(f"{final}.{k}", (f"ln_f.{k}",)) for k in ("weight", "bias") if f"ln_f.{k}" in ours]
    if not cfg.tie_embeddings:
        specs.append(_Spec("lm_head.weight", ("lm_head.weight",)))
    return specs


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files to read, and the index's name -> shard file map (empty for a single file)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single], {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HFImportError(f"cannot read {index}: {e!r} (expected a JSON object with 'weight_map')") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFImportError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        # Shard names are plain file names inside the folder: an index must not point elsewhere on the disk.
        bad = [s for s in shards if Path(s).name != s or s in (".", "..") or not s.endswith(".safetensors")]
        if bad:
            raise HFImportError(f"{index}: shard names must be *.safetensors files in the folder, got {_names(bad)}")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise HFImportError(f"{index} lists shards that are not in {folder}: {_names(missing)}")
        return [folder / s for s in shards], weight_map
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise HFImportError(
            f"{folder} holds only pickled weights ({_names(pickled)}): pickled weights are never loaded (unpickling "
            "can run arbitrary code); convert to safetensors, e.g. save_pretrained(out, safe_serialization=True) in "
            "an environment you trust"
        )
    other = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {_names(other)}, not the Hugging Face layout)" if other else ""
    raise HFImportError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def _open_all(stack: ExitStack, files: list[Path], weight_map: dict[str, str]) -> dict[str, Any]:
    """Open every file with safe_open; return raw tensor name -> handle, refusing duplicates and index mismatches."""
    from safetensors import safe_open

    handles: dict[str, Any] = {}
    where: dict[str, str] = {}
    for f in files:
        try:
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            keys = list(h.keys())
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on malformed files
            raise HFImportError(f"cannot read safetensors file {f}: {e}") from None
        for k in keys:
            if k in handles:
                raise HFImportError(f"tensor '{k}' is in both {where[k]} and {f.name}")
            handles[k], where[k] = h, f.name
    wrong = [n for n, s in weight_map.items() if where.get(n) != s]
    if wrong:
        raise HFImportError(f"model.safetensors.index.json lists tensors not in their shard: {_names(sorted(wrong))}")
    return handles


def _empty_model(cfg: GPTConfig, dtype: torch.dtype) -> GPT:
    """GPT with uninitialized storage (every parameter is then filled from the file) and real RoPE tables."""
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty allocates each module's parameters separately, which unties them
        model.lm_head.weight = model.wte.weight
    if cfg.pos == "rope":
        cos, sin = rope_cache(cfg)
        model.rope_cos.copy_(cos)  # cast like GPT(cfg).to(dtype) would
        model.rope_sin.copy_(sin)
    return model


def _read(handle: Any, raw: str, dtype: torch.dtype) -> torch.Tensor:
    t = handle.get_tensor(raw)
    if not torch.isfinite(t).all():
        raise HFImportError(f"tensor '{raw}' contains NaN or inf values")
    out = t.to(dtype)
    if not torch.isfinite(out).all():
        raise HFImportError(f"tensor '{raw}' overflows {dtype} (finite as stored in {t.dtype}); load in a wider dtype")
    return out


def load_hf_model(
    folder: str | Path, block_size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[GPT, dict[str, Any]]:
    """Load a Hugging Face GPT-2 / Llama / Qwen2 / Mistral folder (config.json + safetensors) into `GPT`.

    Returns the model in eval mode and an info dict: model_type, source, files, num_params, tie_embeddings,
    vocab_size (the checkpoint's), block_size, max_position_embeddings, dtype, ignored_tensors, remote_code_ignored.
    Raises HFImportError (a ValueError) naming the key, file or tensor when the folder cannot be loaded exactly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFImportError(f"{folder} is not a directory")
    hf_cfg = read_hf_config(folder)
    cfg = hf_config_to_gpt(hf_cfg, block_size)
    mt = hf_cfg["model_type"]
    files, weight_map = _weight_files(folder)
    model = _empty_model(cfg, dtype)
    ours = model.state_dict()
    native = int(hf_cfg.get("n_positions" if mt == "gpt2" else "max_position_embeddings") or _MAX_POS_DEFAULT[mt])
    specs = _specs(model, mt, native)

    with ExitStack() as stack:
        handles = _open_all(stack, files, weight_map)
        prefix, ignored_re = _PREFIX[mt], _IGNORED["gpt2" if mt == "gpt2" else "llama"]
        raw_of: dict[str, str] = {}  # canonical name (no model prefix) -> name in the file
        for raw in handles:
            name = raw[len(prefix) :] if raw.startswith(prefix) else raw
            if name in raw_of:
                raise HFImportError(f"tensor '{name}' is stored twice, as '{raw_of[name]}' and '{raw}'")
            raw_of[name] = raw
        wanted = {s.hf_name for s in specs}
        # Missing names are shown as this checkpoint would spell them (with or without the model prefix).
        spell = prefix if any(r.startswith(prefix) for r in handles) else ""
        missing = [n if n == "lm_head.weight" else spell + n for n in (s.hf_name for s in specs) if n not in raw_of]
        ignored = sorted(raw_of[n] for n in raw_of if n not in wanted and ignored_re.search(n))
        extra = sorted(raw_of[n] for n in raw_of if n not in wanted and not ignored_re.search(n))
        tied_copy = cfg.tie_embeddings and "lm_head.weight" in extra
        if tied_copy:  # some checkpoints store the tied head anyway; fine when it really is the embedding
            extra.remove("lm_head.weight")
        if missing or extra:
            parts = [f"missing {len(missing)} tensors: {_names(missing)}"] if missing else []
            parts += [f"unexpected {len(extra)} tensors: {_names(extra)}"] if extra else []
            raise HFImportError(f"{folder} does not match its {mt} config.json: " + "; ".join(parts))

        for s in specs:  # every shape before any data, so a mismatch fails fast
            sl = handles[raw_of[s.hf_name]].get_slice(raw_of[s.hf_name])
            shapes = [tuple(ours[t].shape) for t in s.targets]
            want = (sum(sh[0] for sh in shapes), *shapes[0][1:])
            want = want[::-1] if s.transpose else want
            want = (s.file_rows, *want[1:]) if s.file_rows else want
            got, dt = tuple(sl.get_shape()), sl.get_dtype()
            if got != want:
                raise HFImportError(f"tensor '{raw_of[s.hf_name]}' has shape {list(got)}, config expects {list(want)}")
            if dt not in FLOAT_DTYPES:
                raise HFImportError(f"tensor '{raw_of[s.hf_name]}' has dtype {dt}; only {FLOAT_DTYPES} load exactly")

        loaded: set[str] = set()
        with torch.no_grad():
            for s in specs:
                t = _read(handles[raw_of[s.hf_name]], raw_of[s.hf_name], dtype)
                t = t.t() if s.transpose else t
                t = t[: ours[s.targets[0]].shape[0]] if s.file_rows else t
                for name, part in zip(s.targets, t.split([ours[n].shape[0] for n in s.targets], dim=0)):
                    ours[name].copy_(part)
                    loaded.add(name)
            if tied_copy:
                head = _read(handles[raw_of["lm_head.weight"]], raw_of["lm_head.weight"], dtype)
                if not torch.equal(head, model.wte.weight):
                    raise HFImportError(
                        "config ties the embeddings (tie_word_embeddings) but lm_head.weight differs "
                        "from the token embedding; set tie_word_embeddings=false to use the head"
                    )
    if cfg.tie_embeddings:
        loaded.add("lm_head.weight")
    assert loaded == set(ours), f"unfilled parameters: {sorted(set(ours) - loaded)}"  # mapping bug, not user error
    model.eval()
    info = {
        "model_type": mt,
        "source": str(folder.resolve()),
        "files": [f.name for f in files],
        "num_params": model.num_params(),
        "tie_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "block_size": cfg.block_size,
        "max_position_embeddings": native,
        "dtype": str(dtype).removeprefix("torch."),
        "ignored_tensors": ignored + (["lm_head.weight (tied copy)"] if tied_copy else []),
        "remote_code_ignored": "auto_map" in hf_cfg or any(folder.glob("*.py")),
    }
    return model, info


# --- tokenizer and vocabulary -------------------------------------------------------------------------------------


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    """The folder's `tokenizer.json` as a gptforge `Tokenizer`, with gptforge's reserved special tokens (bos/eos/pad
    and the chat roles) appended as special tokens where missing. Their new ids may exceed the model's vocabulary:
    call `resize_vocab(model, tokenizer.vocab_size)` when they do."""
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(folder)
    p = folder / "tokenizer.json"
    if not p.is_file():
        legacy = [n for n in ("vocab.json", "merges.txt", "tokenizer.model") if (folder / n).is_file()]
        hint = (
            f" It has {', '.join(legacy)}: write tokenizer.json with transformers' "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)."
            if legacy
            else ""
        )
        raise HFImportError(f"{p} not found: pass a gptforge tokenizer or add the model's tokenizer.json.{hint}")
    try:
        hf = HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise HFImportError(f"cannot read tokenizer {p}: {e}") from None
    try:
        return Tokenizer.with_specials(hf, path=p)
    except ValueError as e:
        raise HFImportError(f"{p}: {e}") from None


def resize_vocab(model: GPT, new_vocab_size: int) -> GPT:
    """Grow the token embedding (and an untied head) to `new_vocab_size` rows in place; returns the model.

    Old rows are kept, so every old token's logits are unchanged. New rows start at the mean of the old rows: the
    new tokens then start with an average embedding and, in the head, a logit equal to the mean of the old logits,
    instead of random rows that can dominate the softmax (the init Hugging Face's resize_token_embeddings uses).
    Build the optimizer after resizing: it holds the old parameters."""
    old = model.config.vocab_size
    if new_vocab_size < old:
        raise ValueError(f"resize_vocab only grows the vocabulary: {new_vocab_size} < current {old}")
    if new_vocab_size == old:
        return model

    def grown(p: torch.nn.Parameter) -> torch.nn.Parameter:
        w = p.detach()
        new = torch.empty(new_vocab_size, w.shape[1], dtype=w.dtype, device=w.device)
        new[:old] = w
        new[old:] = w.float().mean(dim=0).to(w.dtype)  # mean in fp32: a bf16 running sum loses precision
        return torch.nn.Parameter(new, requires_grad=p.requires_grad)

    with torch.no_grad():
        model.wte.weight = grown(model.wte.weight)
        model.wte.num_embeddings = new_vocab_size
        if model.config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        else:
            model.lm_head.weight = grown(model.lm_head.weight)
        model.lm_head.out_features = new_vocab_size
    # In place, not a copy: the blocks share this config object and code that changes it (dropout) relies on that.
    model.config.vocab_size = new_vocab_size
    return model
