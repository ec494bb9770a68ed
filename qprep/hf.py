"""Hugging Face models: prepare the inner model of a ``*ForCausalLM`` (or any model with a
``base_model_prefix``) in its place, so that the wrapper stays a Hugging Face model.

>>> prepared = qprep.hf.prepare_for_generate(model, tokenizer("Hello", return_tensors="pt"))
>>> prepared.generate(**inputs, max_new_tokens=20)          # the same token ids as model's

``generate()`` calls the inner model (``model.model`` for Llama) first on the whole prompt and
then on one token at a time with a KV cache; those calls take different paths through
``forward`` (a causal mask for the prompt, none for one token). :func:`prepare_for_generate`
records the inner model's calls during one greedy ``generate()`` on the example, prepares
it with each distinct call as an example input (one graph per path, over one set of
modules: :class:`~qprep.core.variants.VariantGraphModule`) and puts it back. The wrapper
keeps its class, ``config``, ``generate()``, its ``lm_head`` (tied to the embeddings as
before) and its ``state_dict`` keys, so ``save_pretrained``/``from_pretrained`` work as
before. A later call whose shapes take a path no recorded call took raises
:class:`~qprep.GuardError` (prepare with a longer ``decode_steps`` or another example).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn as nn

from .api import prepare
from .core.errors import InputError
from .core.runtime import forked_rng, preserved_state

__all__ = ["prepare_for_generate", "inner_model", "record_calls"]


def inner_model(model: nn.Module) -> tuple[str, nn.Module]:
    """``(attribute name, module)`` of a Hugging Face model's base model (its
    ``base_model_prefix``: ``"model"`` for Llama, ``"transformer"`` for GPT-2)."""
    name = getattr(model, "base_model_prefix", None)
    inner = getattr(model, name, None) if isinstance(name, str) and name else None
    if not isinstance(inner, nn.Module) or inner is model:
        raise InputError(f"{type(model).__name__} has no inner model under its base_model_prefix ({name!r}); "
                         "prepare it with qprep.prepare()")
    return name, inner


def record_calls(model: nn.Module, module: nn.Module, run) -> list[dict]:
    """The arguments of each call of ``module`` (a submodule of ``model``) while ``run()``
    runs, by parameter name (those its forward collects in ``**kwargs`` by their own names),
    each deep-copied when made (a KV cache grows after the call)."""
    calls: list[dict] = []
    signature = inspect.signature(module.forward)
    params = signature.parameters.values()
    var_positional = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
    var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

    def hook(_module, args, kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        if bound.get(var_positional):
            raise InputError(f"{type(module).__name__} was called with arguments its forward collects in "
                             f"*{var_positional}; qprep.hf records calls by parameter name only")
        extra = bound.pop(var_keyword, None) or {}
        calls.append(copy.deepcopy({**bound, **extra}))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with preserved_state(model), forked_rng(), torch.no_grad():
            run()
    finally:
        handle.remove()
    return calls


def prepare_for_generate(model: nn.Module, inputs: dict, *, decode_steps: int = 2, inplace: bool = False,
                         check: bool = True, generate_kwargs: dict | None = None, **options: Any) -> nn.Module:
    """``model`` (a Hugging Face model with ``generate()``) with its inner model prepared.

    Args:
        model: e.g. a ``LlamaForCausalLM``, in eval mode.
        inputs: the keyword inputs of ``generate()`` (``input_ids``, ``attention_mask``).
        decode_steps: how many one-token steps after the prompt to record (each that takes
            a new path becomes a graph of its own).
        inplace: ``False`` (default) prepares a deep copy of ``model``; ``True`` puts the
            prepared inner model into ``model`` itself.
        check: verify each recorded call bitwise (as :func:`qprep.prepare` does).
        generate_kwargs: more arguments for the recording ``generate()`` (greedy by default).
        options: :class:`~qprep.PrepareConfig` fields.

    Returns the wrapper (``model`` or its copy) whose inner model is a prepared GraphModule.
    """
    if not callable(getattr(model, "generate", None)):
        raise InputError(f"{type(model).__name__} has no generate(); prepare it with qprep.prepare()")
    if not isinstance(inputs, dict):
        raise InputError(f"inputs must be generate()'s keyword arguments as a dict, got {type(inputs).__name__}")
    if decode_steps < 0:
        raise InputError(f"decode_steps must be 0 or more, got {decode_steps}")
    work = model if inplace else copy.deepcopy(model)
    name, inner = inner_model(work)
    settings = {"do_sample": False, "max_new_tokens": decode_steps + 1, **(generate_kwargs or {})}
    calls = record_calls(work, inner, lambda: work.generate(**inputs, **settings))
    if not calls:
        raise InputError(f"generate() never called {type(work).__name__}.{name}")
    prepared = prepare(inner, calls[0], variants=calls[1:], inplace=True, check=check, **options)
    setattr(work, name, prepared)
    return work
