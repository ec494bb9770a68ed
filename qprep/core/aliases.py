"""Keep ``state_dict()`` keys stable when qprep registers one tensor under a second name.

Preparing a model registers existing Parameter and buffer objects under new names: a clone
of a re-used module shares its original's weights, the ``nn.Linear`` made from an
``F.linear`` call holds the model's own weight, a modular LSTM's gate ``Linear`` modules hold
``weight_ih_l0``. Those second names are *aliases*. :func:`hide_aliases` makes
``state_dict()`` omit them and ``load_state_dict()`` accept their absence, so a checkpoint of the original loads with ``strict=True`` into the prepared model and back,
and the weights are never copied. Weight ties the *user* made are not aliases: their keys stay.

A key mapped to ``None`` is *private* state qprep added (the step counter of an
``nn.BatchNorm2d`` made from ``F.batch_norm``): hidden from ``state_dict()`` and, when a
checkpoint lacks it, kept at its current value.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

__all__ = ["hide_aliases", "restore_missing_state", "match_order", "match_persistence"]

_ATTR = "_qprep_hidden"


def hide_aliases(root: nn.Module, aliases: Mapping[str, str | None]) -> None:
    """Hide the ``alias`` keys (relative to ``root``) from ``root.state_dict()``.

    ``aliases`` maps each alias key to the canonical key holding the same tensor object
    (``None`` for private state); the canonical key stays and carries the value. The hooks
    sit on the module that owns each alias, so they travel with it through ``deepcopy``,
    ``torch.save`` and GraphModule reconstruction. On load, a missing alias key is filled
    with the owner's own tensor: copying a tensor onto itself is a no-op, and the canonical
    key loads the value into the shared object.
    """
    for alias in aliases:
        owner_name, _, name = alias.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        hidden = getattr(owner, _ATTR, None)
        if hidden is None:
            hidden = set()
            # A plain attribute (not a buffer): it travels with deepcopy and pickling.
            object.__setattr__(owner, _ATTR, hidden)
            owner.register_state_dict_post_hook(_drop_hidden)
            owner.register_load_state_dict_pre_hook(_fill_hidden)
        hidden.add(name)


def _drop_hidden(module, state_dict, prefix, local_metadata):
    for name in getattr(module, _ATTR, ()):
        state_dict.pop(prefix + name, None)


def _fill_hidden(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for name in getattr(module, _ATTR, ()):
        if prefix + name not in state_dict:
            value = getattr(module, name, None)
            if value is not None:
                state_dict[prefix + name] = value


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
            child = _child(source, part)
            if child is None:
                break
            if _child(target, part) is None:
                setattr(target, part, child)  # the whole original submodule, same object
                name = ".".join(path[: i + 1])
                attached.append(name)
                have.update(f"{name}.{k}" for k in child.state_dict(keep_vars=True))
                break
            target, source = _child(target, part), child
        else:
            if isinstance(value, nn.Parameter):
                target.register_parameter(path[-1], value)
            else:
                target.register_buffer(path[-1], value, persistent=True)
            attached.append(key)
            have.add(key)
    return attached


def _child(module: nn.Module, name: str) -> nn.Module | None:
    """``module``'s submodule registered as ``name`` (an alias of another one included), or
    ``None``; a ScriptModule's ``_modules`` is a mapping without ``get()``."""
    modules = module._modules  # noqa: SLF001
    return modules[name] if name in modules else None


def match_order(original: nn.Module, prepared: nn.Module) -> None:
    """Register ``prepared``'s submodules, parameters and buffers in ``original``'s order
    (what it adds after), so ``state_dict()`` lists the keys as the original does. Only the
    containers ``prepared`` owns are reordered; modules shared with ``original`` keep theirs."""
    if prepared is original:
        return
    for attr in ("_modules", "_parameters", "_buffers"):
        ours, theirs = getattr(prepared, attr), getattr(original, attr)
        order = [k for k in theirs if k in ours] + [k for k in ours if k not in theirs]
        if list(ours) != order:
            reordered = {k: ours[k] for k in order}
            ours.clear()
            ours.update(reordered)
    for name, child in prepared._modules.items():  # noqa: SLF001
        counterpart = original._modules.get(name)  # noqa: SLF001
        if child is not None and counterpart is not None and child is not counterpart:
            match_order(counterpart, child)


def match_persistence(original: nn.Module, prepared: nn.Module) -> None:
    """A buffer the original keeps out of ``state_dict()`` (``persistent=False``, such as a
    rotary ``inv_freq``), or a plain tensor attribute of the original (``self.scale =
    torch.tensor(2.0)``, which the graph reads), stays out of it where ``prepared`` registers
    it anew as a buffer."""
    transient = {id(module._buffers[name]) for module in original.modules()  # noqa: SLF001
                 for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None}  # noqa: SLF001
    transient |= {id(value) for module in original.modules() for value in vars(module).values()
                  if isinstance(value, torch.Tensor)}
    if not transient:
        return
    for module in prepared.modules():
        for name, buffer in list(module._buffers.items()):  # noqa: SLF001
            if buffer is not None and id(buffer) in transient:
                module._non_persistent_buffers_set.add(name)  # noqa: SLF001
