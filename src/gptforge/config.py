"""Typed stage configs: defaults < YAML file < `--dotted.key=value` flags.

Configs are pydantic models with `extra="forbid"`, so an unknown key anywhere is an error that names it. Flag values
are parsed as YAML scalars (`3e-4`, `true`, `[a, b]`) except where the field is a string, which keeps the text as
typed. Nothing is ever `eval`ed (the mistake nanoGPT's configurator admits to).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A user mistake in a config file or flag; the message names the key."""


def _field_type(model: type[BaseModel], dotted: str) -> Any:
    """Annotation of the field at a dotted path, or raise ConfigError naming the unknown part."""
    cls: Any = model
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = getattr(cls, "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:i]) or "top level"
            known = ", ".join(sorted(fields)) if fields else "none (not a section)"
            raise ConfigError(f"unknown config key '{dotted}' ('{part}' is not a key of {where}; known: {known})")
        cls = fields[part].annotation
    return cls


def _is_str_like(annotation: Any) -> tuple[bool, bool]:
    """(is a string field, is a list-of-strings field)."""
    origin = typing.get_origin(annotation)
    if annotation is str:
        return True, False
    if origin is typing.Literal and all(isinstance(a, str) for a in typing.get_args(annotation)):
        # A choice of words is text: never YAML-parsed, where `2:4` would become the base-60 integer 124.
        return True, False
    if origin in (list, tuple) and typing.get_args(annotation)[:1] == (str,):
        return False, True
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if args == [str]:
            return True, False
    return False, False


def _is_number(annotation: Any) -> bool:
    return annotation in (int, float)


def parse_overrides(model: type[BaseModel], args: list[str]) -> dict[str, Any]:
    """`['--a.b=1', '--c', 'x', '--flag']` -> nested dict. A bare flag means true and is allowed for boolean keys
    only; a list field may be repeated or given as a YAML flow list (`--a=[x,y]`)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key=value, got '{arg}'")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        annotation = _field_type(model, key)
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw = args[i + 1]
                i += 1
            elif annotation is bool:
                raw = "true"
            else:
                raise ConfigError(f"'--{key}' needs a value (--{key}=VALUE)")
        i += 1
        is_str, is_list = _is_str_like(annotation)
        if is_str:
            value: Any = raw
        elif is_list:
            value = [raw]
            if raw.startswith("[") and raw.endswith("]"):  # --languages='[zh,en]' (YAML flow list) or repeat the flag
                try:
                    parsed = yaml.safe_load(raw)
                except yaml.YAMLError:
                    parsed = None  # not a list after all (a prompt like "[INST] hi [/INST]"): keep the text
                if isinstance(parsed, list) and all(isinstance(v, str | int | float) for v in parsed):
                    value = [str(v) for v in parsed]
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ConfigError(f"cannot parse value for '{key}': {raw!r} ({e.__class__.__name__})") from None
            if _is_number(annotation) and isinstance(value, bool):
                # YAML reads yes/no/on/off/true as booleans, and pydantic would quietly turn them into 1 or 0.
                raise ConfigError(f"bad value for '{key}': expected a number, got {raw!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}' sets a key inside a value that is not a section")
        if is_list and isinstance(node.get(parts[-1]), list):
            node[parts[-1]] = node[parts[-1]] + value
        else:
            node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = prefix + ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{loc}'")
        elif e["type"] == "missing":
            lines.append(f"missing required config key '{loc}' (--{loc}=VALUE)")
        else:
            lines.append(f"bad value for '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def build(model: type[C], data: dict[str, Any]) -> C:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def section_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The defaults of nested sections as plain dicts. A section's default can differ from its class's defaults (the
    demo's model is not GPTConfig()); starting from these keeps it when a flag or YAML sets one key of the section."""
    out = {}
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            out[name] = value.model_dump()
    return out


def load(model: type[C], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Resolve a config: the model's defaults, then the YAML file, then the flags. Errors name the key."""
    data = section_defaults(model)
    if yaml_path:
        data = _merge(data, read_yaml(yaml_path))
    if overrides:
        data = _merge(data, parse_overrides(model, overrides))
    return build(model, data)


def dump(cfg: BaseModel) -> str:
    """YAML text of a resolved config; loading it back gives the same config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
