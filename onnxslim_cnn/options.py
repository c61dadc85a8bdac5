"""Typed pass options: declared as dataclass fields, parsed from ``--set`` strings and recipe files.

A pass declares ``Options`` as a dataclass whose fields carry a help text (``option(...)``).
Values arrive as strings from the command line or as YAML/JSON values from a recipe; both go
through ``coerce`` so that every bad value fails early with one line naming the option.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError


def option(default: Any, help: str, *, choices: "tuple | None" = None,
           min: "float | None" = None, max: "float | None" = None,
           calibration_when: "Callable[[Any], bool] | None" = None) -> Any:
    """A documented dataclass field; ``choices``/``min``/``max`` are checked on every value.

    ``calibration_when(value)`` says whether this value makes the pass read calibration data
    (``bool`` for a switch): the knowledge sits with the option it belongs to, and
    ``Pass.needs_calibration`` asks every option (:func:`needs_calibration`)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "calibration_when": calibration_when}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def needs_calibration(options: Any) -> bool:
    """Whether any option value of ``options`` (a pass's options dataclass) reads calibration data."""
    return any(f.metadata["calibration_when"](getattr(options, f.name)) for f in dataclasses.fields(options)
               if f.metadata.get("calibration_when") is not None)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


def describe(options_cls: type) -> list[dict]:
    """One dict per option: name, type, default, help (for ``--list-passes`` and docs)."""
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append({
            "name": f.name,
            "type": _type_name(hints[f.name]),
            "default": default,
            "help": f.metadata.get("help", ""),
            "choices": f.metadata.get("choices"),
        })
    return out


def make_options(options_cls: type, values: "dict[str, Any] | None", pass_name: str) -> Any:
    """Build a validated options object from raw values (strings or already-typed values)."""
    values = dict(values or {})
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise UserError(f"unknown option '{pass_name}.{key}' (options of {pass_name}: {valid})")
        f = fields[key]
        value = coerce(raw, hints[key], f"{pass_name}.{key}")
        _check_bounds(value, f, f"{pass_name}.{key}")
        kwargs[key] = value
    return options_cls(**kwargs)


def _check_bounds(value: Any, f: dataclasses.Field, label: str) -> None:
    choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
    items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
    for v in items:
        if v is None:
            continue
        if choices is not None and v not in choices:
            raise UserError(f"bad value for {label}: {v!r} (choose from {', '.join(map(str, choices))})")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and v < lo or hi is not None and v > hi:
                bound = (f"within [{lo}, {hi}]" if lo is not None and hi is not None
                         else f">= {lo}" if lo is not None else f"<= {hi}")
                raise UserError(f"bad value for {label}: {v!r} (must be {bound})")


def coerce(raw: Any, tp: Any, label: str) -> Any:
    """Convert ``raw`` (a CLI string or a YAML value) to type ``tp`` or raise a one-line UserError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (raw is None or isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(raw, a, label)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"bad value for {label}: {raw!r}")
    if origin is typing.Literal:
        for a in args:
            if raw == a or isinstance(raw, str) and str(a) == raw:
                return a
        raise UserError(f"bad value for {label}: {raw!r} (choose from {', '.join(map(str, args))})")
    if origin is list:
        (item_tp,) = args or (str,)
        items = [s for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise UserError(f"bad value for {label}: {raw!r} (expected a list)")
        return [coerce(s.strip() if isinstance(s, str) else s, item_tp, label) for s in items]
    if origin is dict:
        key_tp, val_tp = args or (str, str)
        if isinstance(raw, str):
            pairs = {}
            for part in filter(None, (p.strip() for p in raw.split(","))):
                if ":" not in part:
                    raise UserError(f"bad value for {label}: {part!r} (expected name:value pairs)")
                k, v = part.rsplit(":", 1)
                pairs[k.strip()] = v.strip()
            raw = pairs
        if not isinstance(raw, dict):
            raise UserError(f"bad value for {label}: {raw!r} (expected a mapping)")
        return {coerce(k, key_tp, label): coerce(v, val_tp, label) for k, v in raw.items()}
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"bad value for {label}: {raw!r} (expected true or false)")
    if tp is int:
        if isinstance(raw, bool):
            raise UserError(f"bad value for {label}: {raw!r} (expected an integer)")
        try:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        except (TypeError, ValueError):
            raise UserError(f"bad value for {label}: {raw!r} (expected an integer)") from None
    if tp is float:
        if isinstance(raw, bool):
            raise UserError(f"bad value for {label}: {raw!r} (expected a number)")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"bad value for {label}: {raw!r} (expected a number)") from None
        if value != value:
            raise UserError(f"bad value for {label}: nan")
        return value
    if tp is str:
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise UserError(f"bad value for {label}: {raw!r} (expected a string)")
        return str(raw)
    raise TypeError(f"option type {tp!r} of {label} is not supported")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- --set and recipes


def parse_set(items: list[str]) -> dict[str, dict[str, str]]:
    """``["prune.ratio=0.5", ...]`` -> ``{"prune": {"ratio": "0.5"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"bad --set {item!r} (expected PASS.OPTION=VALUE, e.g. prune.ratio=0.5)")
        key, value = item.split("=", 1)
        pass_name, opt = key.split(".", 1)
        out.setdefault(pass_name.strip(), {})[opt.strip()] = value.strip()
    return out


def _read_recipe(path: "str | Path") -> "tuple[Path, dict]":
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except Exception as exc:
        raise UserError(f"{path}: not a valid recipe ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or set(data) - {"passes", "options", "calibration"}:
        raise UserError(f"{path}: a recipe is a mapping with keys 'passes' and 'options' (and 'calibration')")
    return path, data


RECIPE_CALIBRATION_KEYS = ("preprocess", "heldout", "budget")


def recipe_calibration(path: "str | Path") -> dict[str, Any]:
    """A recipe's ``calibration`` block: ``{preprocess: "imagenet,size=224x224"`` (or a mapping
    ``{preset: imagenet, size: 224x224}``), ``heldout: 0.25}``; keys absent are not returned."""
    path, data = _read_recipe(path)
    block = data.get("calibration") or {}
    if not isinstance(block, dict) or set(block) - set(RECIPE_CALIBRATION_KEYS):
        keys = list(map(repr, RECIPE_CALIBRATION_KEYS))
        raise UserError(f"{path}: 'calibration' is a mapping with keys {', '.join(keys[:-1])} and {keys[-1]}")
    return {k: block[k] for k in RECIPE_CALIBRATION_KEYS if block.get(k) is not None}


def load_recipe(path: "str | Path") -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Read a YAML or JSON recipe: ``passes`` (names, or one-key maps name -> options) and ``options``.

    Example::

        passes: [slim, prune]
        options:
          prune: {ratio: 0.5, criterion: l1}
    """
    path, data = _read_recipe(path)
    passes: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    # A string would be iterated character by character and a mapping key by key (its options lost).
    if not isinstance(data.get("passes") or [], list):
        raise UserError(f"{path}: 'passes' must be a list of pass names or one-key maps name: options")
    for entry in data.get("passes") or []:
        if isinstance(entry, str):
            passes.append(entry)
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, opts), = entry.items()
            passes.append(str(name))
            if opts:
                if not isinstance(opts, dict):
                    raise UserError(f"{path}: options of pass {name} must be a mapping")
                options.setdefault(str(name), {}).update(opts)
        else:
            raise UserError(f"{path}: bad pass entry {entry!r}")
    extra = data.get("options") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise UserError(f"{path}: 'options' must map pass names to option mappings")
    for name, opts in extra.items():
        options.setdefault(str(name), {}).update(opts)
    return passes, options
