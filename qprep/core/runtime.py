"""Running a model to inspect or verify it without leaving a trace on it: buffers restored,
the caller's random streams untouched, inputs cloned (a model may update them in place)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

__all__ = ["preserved_state", "forked_rng", "clone_tree", "map_tensors", "seeded"]


@contextlib.contextmanager
def preserved_state(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm statistics, counters) of ``modules`` on exit."""
    saved = []
    for module in modules:
        for buf in module.buffers():
            saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def forked_rng():
    """``torch.random.fork_rng`` over the CPU and every visible CUDA device."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with every random stream seeded with ``seed``, the caller's streams restored after."""
    with forked_rng():
        torch.manual_seed(seed)
        yield


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor, containers rebuilt with their own types
    (lists stay lists, namedtuples stay namedtuples; unlike ``map_aggregate``, which makes
    them immutable, so that a model may still append to a list it is given)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        out = dict.fromkeys(value) if type(value) is dict else value.copy()
        for k, v in value.items():
            out[k] = map_tensors(v, fn)
        return out
    return value


def clone_tree(value: Any) -> Any:
    """``value`` with every tensor cloned (a model may update its inputs in place)."""
    return map_tensors(value, torch.Tensor.clone)
