"""Model loading and example inputs for the ``qprep`` command line.

``MODEL`` is ``package.module:attr`` or ``path/to/file.py:attr`` (:func:`load_model`, with
``--kwargs``); example inputs come from ``--inputs FILE``, or ``--input-shape`` /
``--dtype`` / ``--int-range`` (:func:`build_inputs`), or the model's ``example_inputs()``.
:func:`setup` does both for a subcommand. A problem here is a :class:`UsageError` (exit 2).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import sys
from typing import Any

import torch
import torch.nn as nn

from ..core.inputs import check_call, empty_inputs

__all__ = ["UsageError", "load_model", "resolve", "build_inputs", "parse_int_range", "need_inputs", "setup",
           "parse_concrete"]


class UsageError(Exception):
    """Bad command-line arguments or a model that cannot be loaded: exit 2."""


def _import_file(path: pathlib.Path):
    resolved = str(path.resolve())
    for module in list(sys.modules.values()):  # imported already (the model, then --leaf file.py:Class)
        if getattr(module, "__file__", None) and os.path.abspath(module.__file__) == resolved:
            return module
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else f"qprep_model_{abs(hash(resolved))}"
    folder = str(path.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the file's siblings import as they do when it runs as a script
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pickling (torch.save) finds classes defined in the file
    spec.loader.exec_module(module)
    return module


def resolve(spec: str) -> Any:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"model must be 'package.module:attr' or 'path/to/file.py:attr', got {spec!r}")
    try:
        if target.endswith(".py") or "/" in target or os.sep in target:
            path = pathlib.Path(target)
            if not path.is_file():
                raise UsageError(f"no such file: {target}")
            module = _import_file(path)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001  (any failure importing user code is a loading error)
        raise UsageError(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Build the model ``spec`` names: ``package.module:attr`` or ``path/file.py:attr``,
    where ``attr`` is an ``nn.Module`` class, an instance or a factory function."""
    kwargs = kwargs or {}
    obj = resolve(spec)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise UsageError(f"{spec} is a module instance: --kwargs cannot apply")
        return obj
    if not callable(obj):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not an nn.Module class, instance or factory")
    try:
        model = obj(**kwargs)
    except Exception as exc:  # noqa: BLE001  (a constructor that fails is a loading error)
        raise UsageError(f"cannot build {spec}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise UsageError(f"unknown dtype {name!r} (float32, float16, bfloat16, int64, int32, bool, ...)")
    return value


def _random(shape: list[int], dtype: torch.dtype, g: torch.Generator, int_range: tuple[int, int]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype if dtype.is_complex else torch.float32).to(dtype)
    return torch.randint(int_range[0], int_range[1], shape, generator=g, dtype=dtype)


def parse_int_range(args) -> tuple[int, int] | None:
    if not args.int_range:
        return None
    bounds = _ints(args.int_range, "--int-range")
    if len(bounds) != 2 or bounds[0] >= bounds[1]:
        raise UsageError(f"--int-range must be LOW,HIGH with LOW < HIGH, got {args.int_range!r}")
    return bounds[0], bounds[1]


def build_inputs(args, model: nn.Module) -> tuple | None:
    """Example inputs from ``--inputs``, or ``--input-shape``/``--dtype``/``--int-range``
    (seeded with ``--seed``), or the model's own ``example_inputs()``; ``None`` if none."""
    if args.inputs and args.input_shape:
        raise UsageError("give either --inputs or --input-shape, not both")
    if args.inputs:
        try:
            loaded = torch.load(args.inputs, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot load inputs from {args.inputs}: {type(exc).__name__}: {exc}") from exc
        if isinstance(loaded, torch.Tensor):
            return (loaded,)
        if isinstance(loaded, (list, tuple)):
            return tuple(loaded)
        raise UsageError(f"{args.inputs} holds a {type(loaded).__name__}: save a tensor or a tuple of inputs")
    if args.input_shape:
        shapes = [_ints(s, "--input-shape") for s in args.input_shape]
        dtypes = [_dtype(d) for d in (args.dtype or ["float32"])]
        if len(dtypes) == 1:
            dtypes *= len(shapes)
        if len(dtypes) != len(shapes):
            raise UsageError(f"{len(shapes)} --input-shape but {len(dtypes)} --dtype: give one, or one per input")
        g = torch.Generator().manual_seed(args.seed)
        int_range = parse_int_range(args) or (0, 2)
        return tuple(_random(s, d, g, int_range) for s, d in zip(shapes, dtypes))
    if args.dtype or args.int_range:
        raise UsageError("--dtype and --int-range need --input-shape")
    make = getattr(model, "example_inputs", None)
    if callable(make):
        torch.manual_seed(args.seed)
        inputs = make()
        return inputs if isinstance(inputs, tuple) else (inputs,)
    return None


def need_inputs(inputs: tuple | None, command: str) -> tuple:
    if inputs is None:
        raise UsageError(f"qprep {command} needs example inputs: --input-shape SHAPE (and --dtype), or --inputs FILE")
    return inputs


def _leaves(names: list[str]) -> tuple:
    leaves = []
    for name in names or []:
        if ":" in name:
            obj = resolve(name)
            if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
                raise UsageError(f"--leaf {name}: not an nn.Module class")
            leaves.append(obj)
        else:
            leaves.append(name)
    return tuple(leaves)


def parse_concrete(items: list[str] | None) -> dict | None:
    """``--concrete NAME=VALUE`` (repeatable; VALUE is JSON: ``null``, ``2.0``, ``true``,
    ``"mean"``, ``[1, 2]``) as ``concrete_args``; ``None`` without any."""
    concrete: dict = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--concrete must be NAME=VALUE with VALUE in JSON (mask=null, scale=2.0), got {item!r}")
        if name in concrete:
            raise UsageError(f"--concrete {name}=... is given twice")
        try:
            concrete[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--concrete {name}: {text!r} is not JSON ({exc.msg}); "
                             'a string needs JSON quotes: --concrete mode=\'"mean"\'') from None
    return concrete or None


def _check_inputs(model: nn.Module, inputs: tuple | None, concrete: dict | None) -> None:
    """Inputs that ``forward`` cannot take, or that would make verification vacuous, before
    any work: a :class:`~qprep.InputError` or :class:`UsageError` (exit 2)."""
    check_call(model, inputs, concrete)
    empty = empty_inputs(inputs or ())
    if empty:
        raise UsageError(f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: ops on an empty tensor "
                         "compute nothing, so verifying on it proves nothing; give every dimension a size of at "
                         "least 1")


def setup(args) -> tuple[nn.Module, tuple | None, dict]:
    """Model (seeded, in eval mode unless --train), inputs, and prepare() options; inputs
    checked against ``forward`` (count, ``--concrete`` names) and refused when empty."""
    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--kwargs is not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise UsageError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    torch.manual_seed(args.seed)
    model = load_model(args.model, kwargs)
    model.train(bool(getattr(args, "train", False)) and args.command != "verify")
    inputs = build_inputs(args, model)
    concrete = parse_concrete(args.concrete)
    _check_inputs(model, inputs, concrete)
    options = {"leaf_modules": _leaves(args.leaf), "on_untraceable": args.on_untraceable}
    if concrete:
        options["concrete_args"] = concrete
    return model, inputs, options
