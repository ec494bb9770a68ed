"""Keep ``state_dict()`` keys stable when qprep registers one tensor under a second name.

Preparing a model registers existing Parameter and buffer objects under new names: a clone
of a re-used module shares its original's weights, the ``nn.Linear`` made from an
``F.linear`` call holds the model's own weight, a modular LSTM's gate ``Linear`` modules hold
``weight_ih_l0``. Those second names are *aliases*. :func:`hide_aliases` makes
``state_dict()`` omit them and ``load_state_dict()`` fill them from their canonical key, so
a checkpoint of the original loads with ``strict=True`` into the prepared model and back,
and the weights are never copied. Weight ties the *user* made are not aliases: their keys stay.

A key mapped to ``None`` is *private* state qprep added (the step counter of an
``nn.BatchNorm2d`` made from ``F.batch_norm``): hidden from ``state_dict()`` and, when a
checkpoint lacks it, loaded from its current value.
"""

from __future__ import annotations

from typing import Mapping

import torch.nn as nn

__all__ = ["hide_aliases", "alias_names", "restore_missing_state"]

_ATTR = "_qprep_aliases"


def alias_names(module: nn.Module) -> dict[str, str]:
    """``{alias key: canonical key}`` hidden on ``module`` (relative to it)."""
    return dict(getattr(module, _ATTR, {}))


def hide_aliases(module: nn.Module, aliases: Mapping[str, str | None]) -> None:
    """Hide the ``alias -> canonical`` keys (relative to ``module``) from its state dict.

    Registers the two hooks once per module; later calls add to the mapping.
    """
    existing = getattr(module, _ATTR, None)
    if existing is None:
        existing = {}
        # Plain attribute (not a buffer): it travels with deepcopy and pickling.
        object.__setattr__(module, _ATTR, existing)
        module.register_state_dict_post_hook(_drop_aliases)
        module.register_load_state_dict_pre_hook(_fill_aliases)
    for alias, canonical in aliases.items():
        while canonical is not None and canonical in existing:  # an alias of an alias: point at the root key
            canonical = existing[canonical]
        if alias != canonical:
            existing[alias] = canonical


def _drop_aliases(module, state_dict, prefix, local_metadata):
    for alias in getattr(module, _ATTR, {}):
        state_dict.pop(prefix + alias, None)


def _fill_aliases(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for alias, canonical in getattr(module, _ATTR, {}).items():
        if prefix + alias in state_dict:
            continue
        if canonical is None:
            owner, _, name = alias.rpartition(".")
            state_dict[prefix + alias] = getattr(module.get_submodule(owner), name)
        elif prefix + canonical in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + canonical]


def restore_missing_state(original: nn.Module, prepared: nn.Module) -> list[str]:
    """Attach to ``prepared`` whatever of ``original``'s state it lacks (a parameter no
    ``forward`` uses, a module never called, a second name of a module), as the same
    objects, so every ``state_dict()`` key of the original is a key of the prepared model.
    Returns the attached names."""
    have = set(prepared.state_dict(keep_vars=True))
    attached = []
    for key, value in original.state_dict(keep_vars=True).items():
        if key in have:
            continue
        path = key.split(".")
        target, source = prepared, original
        for i, part in enumerate(path[:-1]):
            child = source._modules.get(part) if isinstance(source, nn.Module) else None
            if child is None:
                break
            if part not in target._modules:
                setattr(target, part, child)  # the whole original submodule, same object
                attached.append(".".join(path[: i + 1]))
                break
            target, source = target._modules[part], child
        else:
            name = path[-1]
            if isinstance(value, nn.Parameter):
                target.register_parameter(name, value)
            else:
                target.register_buffer(name, value, persistent=True)
            attached.append(key)
        have = set(prepared.state_dict(keep_vars=True)) if attached else have
    return attached
