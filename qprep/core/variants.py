"""A GraphModule with one graph per specialisation, over the same modules, chosen by guards.

A model traced on one example input is specialised to it: where its Python read a shape
(``if x.size(1) > 1:``), the prepared model checks the same answer (a guard) and refuses a
call that gives another. Traced on several example inputs, a model may take different
paths: a decoder's first call (a whole prompt) and its next ones (one token, with a cache).
:class:`VariantGraphModule` holds one graph per path, over one set of modules (the passes
ran once, on the union of the traces: an op two paths share is one module, one quantizer),
and runs a graph whose input guards accept the call, as ``torch.compile`` picks a compiled
graph by its guards. Guards that read computed values (a cache's length, an embedding's
shape) are checked where computed, so the choice comes first from the call's *input
signature*, as torch.compile specialises sizes 0 and 1: each tensor's dtype and, per
dimension, whether its size is 0, 1 or more. A graph made for a call with that signature is
tried first; any graph's guards still refuse a call it does not cover. A call no graph
accepts raises :class:`~qprep.GuardError` with each graph's reason.
"""

from __future__ import annotations

from typing import Any

import inspect

import torch
import torch.fx
import torch.nn as nn

from ._compat import forward_from_source
from .dual import _copy_attr
from .errors import GuardError

__all__ = ["VariantGraphModule", "input_signature", "signature_reader"]


def input_signature(value: Any) -> Any:
    """What the choice of a graph looks at in an argument: a tensor's dtype and, per
    dimension, 0, 1 or 2 for "more"; the type of anything else, inside containers."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(min(int(s), 2) for s in value.shape))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(input_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, input_signature(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if isinstance(value, (bool, type(None))) else type(value).__name__
    return type(value).__name__


def signature_reader(graph: torch.fx.Graph):
    """A function of a call's arguments -> parameter name -> :func:`input_signature`, for
    the parameters of ``graph``'s ``forward``."""
    params = inspect.signature(_compiled(graph)).parameters
    signature = inspect.Signature([p for name, p in params.items() if name != "self"])

    def read(*args: Any, **kwargs: Any) -> dict:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return {}
        return {name: input_signature(value) for name, value in bound.arguments.items()}

    return read


def _compiled(graph: torch.fx.Graph):
    code = graph.python_code(root_module="self")
    return forward_from_source(code.src, code.globals)


class VariantGraphModule(torch.fx.GraphModule):
    """Runs the first of ``graphs`` whose guard checks (``checks``, same parameters, no
    compute: the input-only guards of that graph) pass.

    Args:
        root: the module holding every module and tensor the graphs refer to.
        graphs: one complete ``forward`` graph per variant; ``.graph`` shows the first.
        checks: per variant, a graph of its input-only guard checks.
        examples: per variant, a short description of the example input that made it.
        signatures: per variant, the :func:`input_signature` of the calls it was made for (a
            dict of parameter name to signature, for each example it covers).
        mode: ``"train"``/``"eval"``: the graphs were made for this mode only (the forward
            takes another path in the other mode): a call in the other mode is refused.
        mode_reason: why (the default: several examples, each with a path per mode).
    """

    def __init__(self, root: nn.Module, graphs: list[torch.fx.Graph], checks: list[torch.fx.Graph],
                 examples: list[str], class_name: str = "GraphModule", mode: str | None = None,
                 signatures: list[list[dict]] | None = None, mode_reason: str = ""):
        super().__init__(root, graphs[0], class_name)
        for graph in graphs:
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    _copy_attr(root, self, node.target)
        self.variant_graphs = list(graphs)
        self.variant_checks = list(checks)
        self.variant_examples = list(examples)
        self.variant_mode = mode
        self.variant_mode_reason = mode_reason
        self.variant_signatures = signatures or [[] for _ in graphs]
        self._compile_variants()

    def _compile_variants(self) -> None:
        forwards = [_compiled(g) for g in self.variant_graphs]
        checks = [_compiled(g) for g in self.variant_checks]
        examples = self.variant_examples
        mode = self.variant_mode
        why = self.variant_mode_reason or ("its forward takes another path in the other mode, and it was prepared for "
                                          "several example inputs")
        signatures = self.variant_signatures
        order = list(range(len(forwards)))
        call_signature = signature_reader(self.variant_graphs[0])

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if mode is not None and ("train" if self.training else "eval") != mode:
                raise GuardError(f"this model was prepared in {mode} mode only ({why}): call it in "
                                 f"{mode} mode, or prepare it again in the other", expression="self.training",
                                 expected=mode == "train", actual=self.training)
            reasons = []
            if len(forwards) > 1:
                seen = call_signature(*args, **kwargs)
                tried = sorted(order, key=lambda i: seen not in signatures[i])  # a graph made for such a call first
            else:
                tried = order
            for i in tried:
                run, check, example = forwards[i], checks[i], examples[i]
                try:
                    check(self, *args, **kwargs)
                except GuardError as exc:
                    where = f" (needed at {exc.location})" if exc.location else ""
                    reasons.append(f"  - the graph for {example}: `{exc.expression}` gave {exc.actual!r}, "
                                   f"it needs {exc.expected!r}{where}")
                    continue
                return run(self, *args, **kwargs)
            raise GuardError("this call matches none of the prepared model's specialisations:\n" + "\n".join(reasons)
                             + "\nPrepare it with one more example input like this call's (variants=[...]).")

        type(self).forward = forward  # fx gives every GraphModule its own class

    def recompile(self):
        result = super().recompile()
        if "variant_graphs" in self.__dict__:
            self._compile_variants()
        return result

    # deepcopy and pickling keep every graph (GraphModule's own keep the current one only)
    def _deepcopy_init(self):
        def init(res: VariantGraphModule, fake_mod: nn.Module, graph: torch.fx.Graph) -> None:
            state = fake_mod.__dict__
            VariantGraphModule.__init__(res, fake_mod, state["variant_graphs"], state["variant_checks"],
                                        state["variant_examples"], self._get_name(), state.get("variant_mode"),
                                        state.get("variant_signatures"), state.get("variant_mode_reason", ""))

        return init

    def __reduce__(self):
        parts = [torch.fx.GraphModule(self, graph, self._get_name()) for graph in self.variant_graphs]
        return (_rebuild, (parts, self.variant_checks, self.variant_examples, self.training, self._get_name(),
                           dict(self.meta), self.variant_mode, self.variant_signatures, self.variant_mode_reason))


def _rebuild(parts: list[torch.fx.GraphModule], checks: list, examples: list, training: bool, class_name: str,
             meta: dict, mode: str | None = None, signatures: list | None = None,
             mode_reason: str = "") -> VariantGraphModule:
    """Unpickle a :class:`VariantGraphModule` from its single-variant GraphModules, which
    share their modules and tensors (pickle keeps one copy of each)."""
    root = nn.Module()
    for module in parts:
        for node in module.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                _copy_attr(module, root, node.target)
    gm = VariantGraphModule(root, [p.graph for p in parts], checks, examples, class_name, mode, signatures,
                            mode_reason)
    gm.train(training)
    gm.meta.update(meta)
    return gm
