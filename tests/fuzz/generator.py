"""Random ``nn.Module`` programs for fuzzing qprep, written as Python source.

Each program is a small module class rendered as source text, written to a file and
imported, so the tracer sees real source lines and an error can name one. A program is a
pure function of its seed: ``generate(seed)`` gives the same source on every machine.

While it generates, the generator runs every candidate statement on dummy inputs (batch 2
in train mode and batch 3 in eval mode) and keeps it only if it runs in both, keeps the
batch dimension leading and stays small. Shapes, contiguity and aliasing are read off real
tensors, so the programs are valid by construction, in both modes, at more than one batch
size.

A program mixes operators (with reflected and in-place forms, on aliases and on views),
``torch.*`` functions, ``torch.nn.functional`` calls with varied argument spellings (some
with the module's own Parameters and ``self.training``), ``Tensor`` methods, shape reads,
parameters and buffers as operands, re-used modules (also through a second attribute name,
inside ``nn.Sequential`` and helper submodules), recurrent and attention modules,
container inputs (tuple, list, dict, ``None``, defaults, integer ids) and outputs (tuple,
list, dict, namedtuple, nested, ``None``, ints, ``torch.return_types``). Some programs also
hold one construct that today's symbolic tracer refuses (branches and loops on shapes or
values, ``setitem``, iteration over a tensor, ``math`` on a size): those statements are
marked ``untraceable`` and the program knows their source lines.

Features can be switched off (``generate(seed, exclude={"training_branch"})``): the fuzz
test keeps known findings out of its main run that way (see ``tests/test_fuzz.py``).

Print programs: ``python -m tests.fuzz.generator SEED [SEED ...]``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import math
import operator
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Program", "Stmt", "InputSpec", "generate", "FEATURES", "UNTRACEABLE_FEATURES"]

#: Constructs today's symbolic tracer refuses; a program holds at most one of them.
UNTRACEABLE_FEATURES = frozenset({
    "shape_branch", "shape_loop", "shape_math", "value_branch", "setitem", "tensor_iter", "helper_branch",
    "unbound_method",
})

#: Every feature tag a program can carry (for statistics and ``exclude``).
FEATURES = frozenset({
    "operator", "reflected", "torch_fn", "functional", "functional_args", "method", "module", "reused_module",
    "module_alias", "sequential", "param_functional", "param_operand", "constant", "dropout", "batch_norm_train",
    "inplace_alias", "inplace_method", "inplace_view", "inplace_functional", "out_kwarg", "shape_read", "reshape",
    "reduction", "matmul", "cat", "conv", "pool", "norm", "comparison", "dtype", "item", "helper", "helper_tuple",
    "recurrent", "attention", "transformer", "embedding", "training_branch", "training_constant",
    "dropout_not_training", "inplace_alpha_dropout", "inplace_attribute", "default_container", "default_callable",
    "buffer_update", "buffer_assign", "grad_mode", "tensor_constant", "channels_last", "keyword_args",
    "call_spelling", "helper_function", "autograd_function", "runtime_assert", "leaf_fallback", "leaf_attribute", "attribute_arg",
    "container_in", "unpack_in", "dict_in", "none_in", "default_arg", "ids_in",
    "container_out", "namedtuple_out", "nested_out", "int_out", "none_out", "input_out", "return_types_out",
    *UNTRACEABLE_FEATURES,
})

_HELPERS = {
    "Residual": '''
class Residual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x):
        h = self.act(self.fc(x))
        h += x
        return h
''',
    "Gate": '''
class Gate(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training) * torch.sigmoid(x)
''',
    "Stack": '''
class Stack(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.act = nn.ReLU()

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return x
''',
    "Mixer": '''
class Mixer(nn.Module):
    def forward(self, a, b):
        return a * torch.sigmoid(b), b - a
''',
    "Scale": '''
class Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, dim))

    def forward(self, x):
        x = x * self.gamma
        x.add_(self.shift)
        return x
''',
    "gelu_gate": '''
def gelu_gate(z):
    return z * torch.sigmoid(1.702 * z)
''',
    "residual_norm": '''
def residual_norm(z, w):
    h = z + w
    h /= h.norm(dim=-1, keepdim=True) + 1.0
    return h
''',
    "RoundSTE": '''
class RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return torch.round(z * 4.0) / 4.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5
''',
    "ShapeGate": '''
class ShapeGate(nn.Module):
    def forward(self, x):
        if x.size(-1) > 4:
            return x * 0.5
        return x + 0.5
''',
    "RankGate": '''
class RankGate(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = self.fc(x)
        h.add_(1.0)
        self.calls.add_(1)
        if h.dim() == 3:
            return h - h.mean(1, keepdim=True) + x
        return F.relu(h) * 0.5 + x
''',
}

_UNTRACEABLE_HELPERS = ("ShapeGate", "RankGate")
_VOCAB = 11  # integer ids inputs are drawn from range(_VOCAB)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One ``forward`` parameter: a tensor, a tuple / list / dict of two tensors, integer
    ids, ``None``, or a parameter left to its default (``default`` is its source)."""

    name: str
    kind: str  # "tensor" | "tuple" | "list" | "dict" | "ids" | "none" | "default"
    shape: tuple = ()  # ("B", d1, ...): "B" is the batch size
    default: str = ""
    channels_last: bool = False  # a 4-D tensor input in channels-last memory format

    def make(self, batch: int, gen: torch.Generator):
        size = tuple(batch if d == "B" else d for d in self.shape)

        def tensor():
            t = torch.randn(*size, generator=gen)
            return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

        if self.kind == "tensor":
            return tensor()
        if self.kind == "tuple":
            return (tensor(), tensor())
        if self.kind == "list":
            return [tensor(), tensor()]
        if self.kind == "dict":
            return {"a": tensor(), "b": tensor()}
        if self.kind == "ids":
            return torch.randint(0, _VOCAB, size, generator=gen)
        return None  # "none"


@dataclasses.dataclass(frozen=True)
class Stmt:
    """Lines of ``forward`` (relative indentation) and what they are."""

    lines: tuple[str, ...]
    features: frozenset[str]
    defines: tuple[str, ...] = ()
    untraceable: bool = False  # today's symbolic tracer refuses it


@dataclasses.dataclass(frozen=True)
class Program:
    """A generated model: its source, inputs, and the mode it is prepared in."""

    seed: int
    inputs: tuple[InputSpec, ...]
    attrs: tuple[str, ...]  # __init__ lines, "self.x = ..."
    helpers: tuple[str, ...]  # helper classes used
    body: tuple[Stmt, ...]
    output: str  # the return expression
    output_features: frozenset[str]
    namedtuple_fields: tuple[str, ...] = ()
    training: bool = False  # mode at prepare time
    batch: int = 2
    options: tuple[tuple[str, object], ...] = ()  # keyword options for qprep.prepare

    CLASS = "FuzzModel"

    @property
    def name(self) -> str:
        return f"qprep_fuzz_{self.seed}"

    @property
    def features(self) -> frozenset[str]:
        out = set(self.output_features)
        for stmt in self.body:
            out |= stmt.features
        kinds = {s.kind for s in self.inputs}
        out |= {f for k, f in (("dict", "dict_in"), ("none", "none_in"), ("default", "default_arg"),
                               ("ids", "ids_in")) if k in kinds}
        if kinds & {"tuple", "list", "dict"}:
            out.add("container_in")
        if "helper_branch" in out:
            out.add("helper")
        if any(s.channels_last for s in self.inputs):
            out.add("channels_last")
        return frozenset(out)

    @property
    def untraceable(self) -> bool:
        return bool(self.features & UNTRACEABLE_FEATURES)

    def render(self) -> tuple[str, set[int]]:
        """The source, and the line numbers of the constructs today's tracer refuses."""
        options = "".join(f", {k}={v!r}" for k, v in self.options)
        lines = [f"# qprep fuzz program, seed {self.seed}: qprep.prepare(model, inputs, check=False{options})",
                 "import collections", "import functools", "import math", "import operator", "",
                 "import torch", "import torch.nn as nn", "import torch.nn.functional as F", ""]
        untraceable: set[int] = set()
        if self.namedtuple_fields:
            lines += [f"Out = collections.namedtuple('Out', {list(self.namedtuple_fields)!r})", ""]
        for helper in self.helpers:
            start = len(lines) + 1
            text = _HELPERS[helper].strip("\n").splitlines()
            lines += text + ["", ""]
            if helper in _UNTRACEABLE_HELPERS:
                untraceable |= set(range(start, start + len(text)))
        lines += [f"class {self.CLASS}(nn.Module):", "    def __init__(self):", "        super().__init__()"]
        lines += [f"        {a}" for a in self.attrs]
        lines.append("")
        params = ", ".join(s.name if s.kind != "default" else f"{s.name}={s.default}" for s in self.inputs)
        lines.append(f"    def forward(self, {params}):")
        for stmt in self.body:
            start = len(lines) + 1
            lines += [f"        {line}" for line in stmt.lines]
            if stmt.untraceable:
                untraceable |= set(range(start, len(lines) + 1))
        lines.append(f"        return {self.output}")
        return "\n".join(lines) + "\n", untraceable

    @property
    def source(self) -> str:
        return self.render()[0]

    def write(self, directory: Path | str) -> Path:
        path = Path(directory) / f"{self.name}.py"
        path.write_text(self.source)
        return path

    def load(self, directory: Path | str) -> nn.Module:
        """Write the source, import it (a fresh module each time) and build the model with
        its parameters drawn from the program's seed, in the program's mode."""
        path = self.write(directory)
        spec = importlib.util.spec_from_file_location(self.name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = getattr(module, self.CLASS)()
        return model.train(self.training)

    def make_inputs(self, batch: int | None = None, seed: int = 0) -> tuple:
        """Example inputs (``seed`` 0) or fresh ones of the same shapes (another ``seed``);
        ``batch`` replaces the program's batch size. Parameters left to their defaults are
        not passed."""
        gen = torch.Generator().manual_seed(self.seed * 1009 + seed)
        return tuple(s.make(self.batch if batch is None else batch, gen) for s in self.inputs if s.kind != "default")

    def without(self, index: int) -> Program:
        """The same program with statement ``index`` removed (for shrinking)."""
        return dataclasses.replace(self, body=self.body[:index] + self.body[index + 1:])


# ----------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------

_ATTRIBUTE = re.compile(r"\.(values|indices|mT|mH|T|H|data|real)$")  # an attribute read, not a call
# A tensor factory called with constants only: traced, it becomes a `_tensor_constant` attribute.
_CONSTANT_FACTORY = re.compile(r"torch\.(tensor|arange|linspace|ones|zeros|full|eye)\(([^()]*)\)")
_VALUE_NAME = re.compile(r"\b(t\d+|x|y|ids|pair|items|feats|mask|self)\b")
_MAX_NUMEL = 384  # per sample: keeps programs fast
_MAX_DIM = 32
_BATCHES = (2, 3)  # dummy runs: batch 2 in train mode, batch 3 in eval mode


def _helper_namespace() -> dict:
    ns = {"torch": torch, "nn": nn, "F": F, "math": math, "collections": collections, "functools": functools,
          "operator": operator}
    for text in _HELPERS.values():
        exec(text, ns)  # noqa: S102  (our own fixed helper classes)
    return ns


_NS = _helper_namespace()


@dataclasses.dataclass
class _Candidate:
    lines: tuple[str, ...]
    features: set[str]
    pool: tuple[str, ...] = ()  # defined names that become pool values (batch-leading float tensors)
    untraceable: bool = False
    attribute: tuple[str, ...] = ()  # names bound to an attribute read (`x.mT`, `.values`): torch.fx Attribute proxies


class _Rejected(Exception):
    pass


class _Builder:
    def __init__(self, seed: int, exclude: frozenset[str], untraceable_rate: float):
        self.rng = random.Random(seed)
        self.seed = seed
        self.exclude = exclude
        self.untraceable_rate = untraceable_rate
        self.attrs: dict[str, str] = {}
        self.helpers: list[str] = []
        self.body: list[Stmt] = []
        self.pool: list[str] = []
        self.attribute_vars: set[str] = set()
        self.default_use = ("", "")
        self.ids: str | None = None  # name of the integer ids input
        self.counter = 0
        self.modules: dict[str, list[str]] = {}  # constructor source -> attribute names
        self.specs: tuple[InputSpec, ...] = ()
        self.envs: dict[int, dict] = {}
        self.materialized: set[str] = set()
        self.holders: dict[int, nn.Module] = {}

    # -- bookkeeping --------------------------------------------------------------------
    def ok(self, *features: str) -> bool:
        return not (set(features) & self.exclude)

    def fresh(self) -> str:
        self.counter += 1
        return f"t{self.counter}"

    def choice(self, seq):
        return self.rng.choice(list(seq))

    def val(self, name: str) -> torch.Tensor:
        return self.envs[2][name]

    def shape(self, name: str) -> tuple:
        return tuple(self.val(name).shape)[1:]

    def pick(self, pred=lambda name: True) -> str | None:
        cands = [n for n in self.pool if pred(n)]
        if not cands:
            return None
        return self.rng.choices(cands, [i + 1 for i in range(len(cands))])[0]  # recent values more often

    def partner(self, v: str, same_shape: bool = True, other_storage: bool = False) -> str | None:
        cands = [w for w in self.pool if w != v and (not same_shape or self.shape(w) == self.shape(v))
                 and (not other_storage or not self.aliases(v, w))]
        return self.rng.choice(cands) if cands else None

    def aliases(self, a: str, b: str) -> bool:
        return self.val(a).untyped_storage().data_ptr() == self.val(b).untyped_storage().data_ptr()

    def writable(self, name: str) -> bool:
        t = self.val(name)
        return all(s != 0 or n == 1 for s, n in zip(t.stride(), t.shape))

    def attr(self, prefix: str, line_fmt: str) -> str:
        """A new attribute ``self.<prefix><n>``; ``line_fmt`` has ``{name}``."""
        n = 0
        while f"{prefix}{n}" in self.attrs:
            n += 1
        name = f"{prefix}{n}"
        self.attrs[name] = line_fmt.replace("{name}", name)
        return f"self.{name}"

    def param(self, prefix: str, init: str) -> str:
        return self.attr(prefix, "self.{name} = nn.Parameter(" + init + ")")

    def buffer(self, prefix: str, init: str) -> str:
        return self.attr(prefix, "self.register_buffer('{name}', " + init + ")")

    def module(self, prefix: str, ctor: str, reuse: float = 0.5) -> tuple[str, set[str]]:
        """``self.<name>`` for a module built by ``ctor``: with probability ``reuse`` one that
        exists already (a re-used module), sometimes through a second attribute name."""
        existing = self.modules.get(ctor, [])
        features = {"module"}
        if existing and self.rng.random() < reuse and self.ok("reused_module"):
            name = self.choice(existing)
            if self.rng.random() < 0.25 and self.ok("module_alias"):
                first = name
                name = self.attr(f"{prefix}_alias", "self.{name} = self." + first)[5:]
                self.modules[ctor].append(name)
                features.add("module_alias")
            features.add("reused_module")
        else:
            name = self.attr(prefix, "self.{name} = " + ctor)[5:]
            self.modules.setdefault(ctor, []).append(name)
        return f"self.{name}", features

    def helper(self, cls: str) -> None:
        if cls not in self.helpers:
            self.helpers.append(cls)

    # -- dummy runs ---------------------------------------------------------------------
    def _reset_envs(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        for batch, train in zip(_BATCHES, (True, False)):
            holder = nn.Module()
            env = dict(_NS)
            env["self"] = holder
            for line in self.attrs.values():
                exec(line, env)  # noqa: S102
            holder.train(train)
            self.materialized = set(self.attrs)
            for spec in self.specs:
                env[spec.name] = eval(spec.default, env) if spec.kind == "default" else spec.make(batch, gen)  # noqa: S307
            self.envs[batch], self.holders[batch] = env, holder
        for stmt in self.body:
            self._run(stmt.lines)

    def _run(self, lines: tuple[str, ...]) -> None:
        code = "\n".join(lines)
        for env in self.envs.values():
            exec(code, env)  # noqa: S102

    def _valid(self, name: str) -> bool:
        vals = [self.envs[b].get(name) for b in _BATCHES]
        if not all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in vals):
            return False
        a, b = vals
        if a.dim() < 2 or a.shape[0] != 2 or b.shape[0] != 3 or a.shape[1:] != b.shape[1:]:
            return False
        return 0 < math.prod(a.shape[1:]) <= _MAX_NUMEL and max(a.shape[1:]) <= _MAX_DIM

    def try_add(self, cand: _Candidate | None) -> bool:
        """Run ``cand`` on the dummy inputs; keep it if it runs and its values are valid."""
        if cand is None:
            return False
        if any(not _VALUE_NAME.search(m.group(2)) for line in cand.lines for m in _CONSTANT_FACTORY.finditer(line)):
            if not self.ok("tensor_constant"):
                return False
            cand.features.add("tensor_constant")
        stmt = Stmt(tuple(cand.lines), frozenset(cand.features), cand.pool, cand.untraceable)
        try:
            new = [name for name in self.attrs if name not in self.materialized]
            self._run(tuple(self.attrs[name] for name in new))
            self.materialized.update(new)
            for batch, holder in self.holders.items():
                holder.train(batch == _BATCHES[0])  # new submodules take the holder's mode
            self._run(stmt.lines)
            if not all(self._valid(n) for n in cand.pool):
                raise _Rejected
        except Exception:  # noqa: BLE001  (any failure: the candidate is dropped)
            return False
        self.body.append(stmt)
        self.pool += [n for n in cand.pool if n not in self.pool]
        self.attribute_vars.update(cand.attribute)
        return True

    # -- inputs -------------------------------------------------------------------------
    def make_inputs(self) -> tuple[InputSpec, ...]:
        layout = self.choice(["vec", "vec", "seq", "seq", "seq", "img"])
        if layout == "vec":
            shape = ("B", self.choice([4, 6, 8, 12]))
        elif layout == "seq":
            shape = ("B", self.choice([3, 4, 5]), self.choice([4, 6, 8]))
        else:
            shape = ("B", self.choice([2, 3, 4]), self.choice([4, 6]), self.choice([4, 6]))
        channels_last = layout == "img" and self.rng.random() < 0.3 and self.ok("channels_last")
        specs = [InputSpec("x", "tensor", shape, channels_last=channels_last)]
        self.pool.append("x")
        second = self.choice(["none", "none", "tensor", "tuple", "list", "dict", "ids", "optional", "default"])
        tags = {"tuple": {"container_in"}, "list": {"container_in"}, "dict": {"container_in", "dict_in"},
                "ids": {"ids_in"}, "optional": {"none_in"}, "default": {"default_arg"}}
        if not self.ok(*tags.get(second, ())):
            second = "none"
        if second == "ids" and layout != "seq":
            second = "tensor"
        if second == "tensor":
            specs.append(InputSpec("y", "tensor", shape))
            self.pool.append("y")
        elif second in ("tuple", "list", "dict"):
            name = {"tuple": "pair", "list": "items", "dict": "feats"}[second]
            specs.append(InputSpec(name, second, shape))
        elif second == "ids":
            specs.append(InputSpec("ids", "ids", shape[:2]))
            self.ids = "ids"
        elif second == "optional":
            specs.append(InputSpec("mask", "none"))
        elif second == "default":
            name, default, use, feature = self.choice(self._defaults())
            specs.append(InputSpec(name, "default", default=default))
            self.default_use = (use, feature)
        self.specs = tuple(specs)
        self._reset_envs()
        if second in ("tuple", "list", "dict"):
            name = specs[1].name
            a, b = self.fresh(), self.fresh()
            if second == "dict":
                lines = (f"{a} = {name}['a']", f"{b} = {name}['b']")
                feats = {"container_in", "dict_in"}
            elif self.rng.random() < 0.4 and self.ok("unpack_in"):
                lines, feats = (f"{a}, {b} = {name}",), {"container_in", "unpack_in"}
            else:
                lines, feats = (f"{a} = {name}[0]", f"{b} = {name}[-1]"), {"container_in"}
            self.try_add(_Candidate(lines, feats, (a, b)))
        return tuple(specs)

    def _defaults(self) -> list[tuple[str, str, str, str]]:
        """(parameter, default source, use with {v} and {t}, feature) for a parameter left to its default."""
        forms = [("scale", "0.5", "{t} = {v} * scale + scale", "default_arg"),
                 ("scale", "-1.0", "{t} = {v} * scale + scale", "default_arg"),
                 ("k", "2", "{t} = {v} * k", "default_arg"),
                 ("flag", "True", "{t} = {v} * 2.0 if flag else {v}", "default_arg"),
                 ("mode", "'tanh'", "{t} = F.gelu({v}, approximate=mode)", "default_arg"),
                 ("dtype", "torch.float64", "{t} = {v}.to(dtype).sigmoid().float()", "default_arg")]
        if self.ok("default_container"):
            forms += [("dims", "(-1,)", "{t} = {v}.sum(dims, keepdim=True)", "default_container"),
                      ("scales", "[0.5, 2.0]", "{t} = {v} * scales[0] + scales[1]", "default_container"),
                      ("cfg", "{'a': 0.5}", "{t} = {v} * cfg['a']", "default_container")]
        if self.ok("default_callable"):
            forms += [("act", "F.relu", "{t} = act({v})", "default_callable"),
                      ("act", "torch.tanh", "{t} = act({v}) + {v}", "default_callable")]
        return forms

    # -- statement kinds ----------------------------------------------------------------
    def s_unary(self) -> _Candidate | None:
        v = self.pick()
        dim = self.choice([-1, 1])
        t = self.fresh()
        if self.ok("module") and self.rng.random() < 0.25:
            ctor = self.choice(["nn.ReLU()", "nn.GELU()", "nn.Sigmoid()", "nn.Tanh()", "nn.SiLU()", "nn.Identity()",
                                f"nn.Softmax(dim={dim})", "nn.LeakyReLU(0.1)", "nn.Hardswish()", "nn.ELU(alpha=0.5)"])
            mod, feats = self.module("act", ctor, reuse=0.7)
            return _Candidate((f"{t} = {mod}({v})",), feats, (t,))
        forms = [
            ("method", f"{v}.sigmoid()"), ("method", f"{v}.tanh()"), ("method", f"{v}.abs()"),
            ("method", f"{v}.neg()"), ("method", f"{v}.clamp(min=-1.0, max=1.0)"), ("method", f"{v}.relu()"),
            ("method", f"{v}.square()"), ("method", f"{v}.exp()"), ("method", f"{v}.softmax({dim})"),
            ("method", f"{v}.pow(2)"), ("method", f"{v}.clamp_min(0.0)"), ("method", f"{v}.erf()"),
            ("method", f"{v}.log_softmax(dim={dim})"), ("method", f"{v}.cumsum({dim})"),
            ("method", f"{v}.clip(-0.5, 0.5)"), ("method", f"{v}.rsqrt()"), ("method", f"{v}.sin()"),
            ("torch_fn", f"torch.sigmoid({v})"), ("torch_fn", f"torch.tanh({v})"), ("torch_fn", f"torch.relu({v})"),
            ("torch_fn", f"torch.abs({v})"), ("torch_fn", f"torch.clamp({v}, -0.5, 0.5)"),
            ("torch_fn", f"torch.exp(-{v})"), ("torch_fn", f"torch.softmax({v}, dim={dim})"),
            ("torch_fn", f"torch.log1p({v}.abs())"), ("torch_fn", f"torch.sqrt({v}.abs() + 1e-3)"),
            ("torch_fn", f"torch.sign({v}) * {v}"), ("torch_fn", f"torch.floor({v} * 4.0)"),
            ("torch_fn", f"torch.round({v}, decimals=1)"), ("torch_fn", f"torch.reciprocal({v}.abs() + 1.0)"),
            ("torch_fn", f"torch.cumprod({v}.tanh(), dim={dim})"), ("torch_fn", f"torch.flip({v}, dims=[-1])"),
            ("torch_fn", f"torch.roll({v}, 1, -1)"), ("torch_fn", f"torch.atan2({v}, {v}.abs() + 1.0)"),
            ("torch_fn", f"torch.fmod({v}, 0.5)"), ("torch_fn", f"torch.remainder({v}, 0.75)"),
            ("operator", f"{v} // 0.5"), ("operator", f"{v} % 0.3"),
            ("functional", f"F.relu({v})"), ("functional", f"F.gelu({v})"), ("functional", f"F.silu({v})"),
            ("functional", f"F.leaky_relu({v}, 0.2)"), ("functional", f"F.elu({v})"),
            ("functional", f"F.hardtanh({v}, -0.5, 0.5)"), ("functional", f"F.softplus({v})"),
            ("functional", f"F.hardswish({v})"), ("functional", f"F.relu6({v})"), ("functional", f"F.sigmoid({v})"),
            ("functional", f"F.softmax({v}, dim={dim})"), ("functional", f"F.log_softmax({v}, {dim})"),
            ("functional", f"F.normalize({v}, dim=-1)"), ("functional", f"F.mish({v})"),
        ]
        forms = [f for f in forms if self.ok(f[0])]
        feature, expr = self.choice(forms)
        return _Candidate((f"{t} = {expr}",), {feature}, (t,))

    def s_functional_args(self) -> _Candidate | None:
        """Functional calls with non-default arguments, positional and keyword."""
        if not self.ok("functional", "functional_args"):
            return None
        v = self.pick()
        t = self.fresh()
        forms = [
            f"F.elu({v}, alpha=0.5)", f"F.elu({v}, 2.0)", f"F.celu({v}, alpha=1.5)", f"F.selu({v})",
            f"F.leaky_relu({v}, negative_slope=0.3)", f"F.hardtanh({v}, min_val=-2.0, max_val=0.5)",
            f"F.hardtanh({v}, -0.3)", f"F.softplus({v}, beta=2.0, threshold=5.0)", f"F.softplus({v}, 0.5)",
            f"F.threshold({v}, 0.1, -1.0)", f"F.softshrink({v}, 0.3)", f"F.hardshrink({v}, lambd=0.2)",
            f"F.tanhshrink({v})", f"F.softsign({v})", f"F.logsigmoid({v})", f"F.hardsigmoid({v})",
            f"F.gelu({v}, approximate='tanh')", f"F.gelu({v}, approximate='none')", f"F.glu({v})",
            f"F.glu({v}, dim=1)", f"F.softmin({v}, dim=1)", f"F.softmax({v})",
            f"F.log_softmax({v}, dim=-1, dtype=torch.float64).float()",
            f"F.softmax({v}, -1, dtype=torch.float64).float()", f"torch.softmax({v}, -1, torch.float64).float()",
            f"{v}.softmax(-1, dtype=torch.float64).float()", f"F.normalize({v}, p=1.0, dim=1)",
            f"F.normalize({v}, 2.0, -1, 1e-6)", f"F.cosine_similarity({v}, {v}.flip(-1), dim=-1).unsqueeze(-1)",
            f"F.pairwise_distance({v}, {v}.tanh(), keepdim=True)", f"F.rrelu({v}, training=self.training)",
            f"F.rrelu({v}, 0.1, 0.3, self.training)", f"F.rrelu({v})",
            f"F.layer_norm({v}, {self.shape(v)[-1:]!r}, eps=1e-3)", f"F.rms_norm({v}, {self.shape(v)[-1:]!r})",
            f"F.local_response_norm({v}, 2)", f"F.alpha_dropout({v}, 0.2, self.training)",
            f"F.feature_alpha_dropout({v}, 0.2, training=self.training)", f"F.dropout1d({v}, 0.5, self.training)",
        ]
        if len(self.shape(v)) == 3:  # (B, C, H, W) below; (B, C, L) here
            forms += [f"F.max_pool1d({v}, 2)", f"F.avg_pool1d({v}, 3, stride=1, padding=1)",
                      f"F.adaptive_max_pool1d({v}, 2)", f"F.lp_pool1d({v}, 2.0, 2)",
                      f"F.pad({v}, (1, 2), mode='replicate')", f"F.pad({v}, [1, 1], value=0.5)",
                      f"F.interpolate({v}, scale_factor=2, mode='linear')", f"F.instance_norm({v})"]
        if len(self.shape(v)) == 4:
            forms += [f"F.max_pool2d({v}, 3, stride=1, padding=1)", f"F.max_pool2d({v}, kernel_size=2, stride=1)",
                      f"F.max_pool2d({v}, 3, 2, 1)", f"F.max_pool2d({v}, 2, ceil_mode=True)",
                      f"F.max_pool2d({v}, 2, return_indices=True)[0]", f"F.max_pool2d({v}, 2, dilation=2, padding=1)",
                      f"F.avg_pool2d({v}, 2, stride=1, count_include_pad=False)",
                      f"F.avg_pool2d({v}, 3, 1, 1, False, False)", f"F.avg_pool2d({v}, 2, divisor_override=3)",
                      f"F.adaptive_avg_pool2d({v}, 1)", f"F.adaptive_max_pool2d({v}, (2, 1))",
                      f"F.adaptive_max_pool2d({v}, 2, return_indices=True)[0]", f"F.lp_pool2d({v}, 2, 2)",
                      f"F.interpolate({v}, size=(5, 3), mode='nearest')",
                      f"F.interpolate({v}, scale_factor=1.5, mode='bilinear', align_corners=True)",
                      f"F.interpolate({v}, scale_factor=2, mode='bicubic', align_corners=False)",
                      f"F.interpolate({v}, scale_factor=0.5, mode='area')",
                      f"F.interpolate({v}, scale_factor=2, mode='nearest-exact')",
                      f"F.interpolate({v}, scale_factor=(2, 1), mode='nearest', recompute_scale_factor=True)",
                      f"F.interpolate({v}, scale_factor=2, mode='bilinear', antialias=True)",
                      f"F.upsample({v}, scale_factor=2)",
                      f"F.pad({v}, (1, 1, 2, 0))", f"F.pad({v}, (1, 1, 1, 1), mode='reflect')",
                      f"F.pad({v}, (2, 2, 1, 1), 'circular')", f"F.pad({v}, (0, 1, 0, 1), value=-1.0)",
                      f"F.pad({v}, (1, 1, 1, 1, 1, 1))", f"F.pixel_unshuffle({v}, 2)",
                      f"F.pixel_shuffle({v}.repeat(1, 4, 1, 1), 2)", f"F.channel_shuffle({v}.repeat(1, 2, 1, 1), 2)",
                      f"F.dropout2d({v}, p=0.3, training=self.training)", f"F.instance_norm({v}, eps=1e-3)",
                      f"F.unfold({v}, 2, stride=2)", f"F.local_response_norm({v}, size=3, alpha=0.01)"]
        return _Candidate((f"{t} = {self.choice(forms)}",), {"functional", "functional_args"}, (t,))

    def s_binary(self) -> _Candidate | None:
        v = self.pick()
        w = self.partner(v) if self.rng.random() < 0.7 else None
        c = self.choice(["0.5", "2.0", "1.5", "3", "-0.25"])
        t = self.fresh()
        if w is not None:
            forms = [
                ("operator", f"{v} + {w}"), ("operator", f"{v} - {w}"), ("operator", f"{v} * {w}"),
                ("operator", f"{v} / ({w}.abs() + 1.0)"), ("operator", f"({v} + {w}) * 0.5"),
                ("operator", f"{v} * {w} - {v}"), ("torch_fn", f"torch.add({v}, {w}, alpha=0.5)"),
                ("torch_fn", f"torch.mul({v}, {w})"), ("torch_fn", f"torch.sub({v}, {w})"),
                ("torch_fn", f"torch.maximum({v}, {w})"), ("torch_fn", f"torch.minimum({v}, {w})"),
                ("comparison", f"torch.where({v} > {w}, {v}, {w})"), ("comparison", f"torch.where({v} > 0, {w}, 0.0)"),
                ("comparison", f"(({v} > 0) & ({w} < 0)).float() + {v}"), ("comparison", f"{v} * ~({w} > 0)"),
                ("comparison", f"torch.logical_or({v} > 1, {w} > 1).float()"), ("comparison", f"({v} == {w}).float()"),
                ("method", f"{v}.add({w})"), ("method", f"{v}.mul({w})"), ("method", f"{v}.sub({w}, alpha=2)"),
                ("method", f"{v}.where({w} > 0, {w})"), ("method", f"{v}.lerp({w}, 0.3)"),
                ("torch_fn", f"torch.addcmul({v}, {v}, {w}, value=0.5)"), ("torch_fn", f"torch.lerp({v}, {w}, 0.25)"),
                ("torch_fn", f"torch.addcdiv({v}, {v}, {w}.abs() + 1.0)"), ("torch_fn", f"torch.clamp({v}, min={w})"),
                ("torch_fn", f"torch.pow({v}.abs(), {w}.tanh())"), ("torch_fn", f"torch.lerp({v}, {w}, {w}.sigmoid())"),
                ("operator", f"{v} ** 2 + {w}"),
            ]
        else:
            forms = [
                ("operator", f"{v} + {c}"), ("operator", f"{v} * {c}"), ("operator", f"{v} - {c}"),
                ("operator", f"{v} / {c}"), ("operator", f"-{v}"), ("operator", f"{v} ** 2"),
                ("reflected", f"{c} - {v}"), ("reflected", f"{c} * {v}"), ("reflected", f"{c} + {v}"),
                ("reflected", f"1.0 / ({v}.abs() + 1.0)"), ("reflected", f"2 ** {v}.tanh()"),
                ("reflected", f"{c} / ({v}.abs() + 0.5)"), ("reflected", f"1 - {v}.sigmoid()"),
                ("method", f"{v}.add(1.0)"), ("method", f"{v}.mul(0.5)"), ("method", f"{v}.div(4)"),
                ("method", f"{v}.div(3, rounding_mode='floor')"), ("method", f"{v}.sub(1, alpha=0.5)"),
                ("torch_fn", f"torch.mul({v}, 2)"), ("torch_fn", f"torch.add({v}, 1.0, alpha=3)"),
                ("torch_fn", f"torch.rsub({v}, 1.0)"), ("torch_fn", f"torch.true_divide({v}, 2)"),
                ("comparison", f"{v} * ({v} > 0)"), ("comparison", f"({v} < 0.5).float() * {v}"),
                ("comparison", f"{v}.masked_fill({v} < 0, 0.0)"), ("comparison", f"torch.masked_fill({v}, {v} > 1, 1.0)"),
                ("comparison", f"({v} >= 0).to({v}.dtype) - 0.5"), ("comparison", f"{v}.gt(0.1).type_as({v})"),
                ("reduction", f"{v} - {v}.mean(-1, keepdim=True)"),
                ("reduction", f"{v} / ({v}.abs().sum(dim=-1, keepdim=True) + 1.0)"),
                ("reduction", f"{v} * {v}.amax(dim=1, keepdim=True)"),
                ("reduction", f"{v} - torch.mean({v}, dim=-1, keepdim=True)"),
                ("reduction", f"{v} / ({v}.std(-1, keepdim=True, unbiased=False) + 1.0)"),
                ("reduction", f"{v} - {v}.var(dim=-1, correction=0, keepdim=True)"),
                ("reduction", f"{v} / ({v}.norm(dim=-1, keepdim=True) + 1.0)"),
                ("reduction", f"{v} - torch.logsumexp({v}, -1, keepdim=True)"),
                ("reduction", f"{v} - {v}.amin(-1, True)"), ("reduction", f"{v} * {v}.sum(dim=(1,), keepdim=True)"),
                ("reduction", f"{v} * torch.prod({v}.tanh(), dim=-1, keepdim=True)"),
                ("dtype", f"({v}.double() * 1.1).float()"), ("dtype", f"{v}.half().float()"),
                ("dtype", f"{v}.to(torch.float64).sigmoid().to(torch.float32)"),
                ("dtype", f"{v}.bfloat16().float() + {v}"), ("dtype", f"torch.float_power({v}, 2).float()"),
                ("dtype", f"{v} + {v}.long()"), ("dtype", f"{v} * {v}.int().float()"),
            ]
        forms = [f for f in forms if self.ok(f[0])]
        feature, expr = self.choice(forms)
        return _Candidate((f"{t} = {expr}",), {feature}, (t,))

    def s_param_operand(self) -> _Candidate | None:
        if not self.ok("param_operand"):
            return None
        v = self.pick()
        shape = self.shape(v)
        f = shape[-1]
        t = self.fresh()
        forms = [
            lambda: f"{v} * {self.param('scale', f'torch.full(({f},), 0.5)')}",
            lambda: f"{v} + {self.param('bias', f'0.1 * torch.randn({f})')}",
            lambda: f"{self.param('gain', 'torch.tensor(1.5)')} * {v}",
            lambda: f"{v} - {self.buffer('mu', f'torch.linspace(-1.0, 1.0, {f})')}",
            lambda: f"torch.addcmul({v}, {v}, {self.param('alpha', f'torch.ones({f})')})",
            lambda: f"{v} * {self.param('w_full', f'torch.randn{tuple(shape)!r}')}",
            lambda: f"{v} + {self.buffer('const', 'torch.tensor(0.25)')}",
            lambda: f"{v} * torch.tensor(0.5)",
            lambda: f"{v} + torch.arange({f}, dtype=torch.float32)",
            lambda: f"{v} * torch.linspace(0.0, 1.0, {f})",
            lambda: f"{v} + torch.full_like({v}, 0.5)",
            lambda: f"{v} * torch.ones_like({v}) - torch.rand_like({v}) * 0.0",
        ]
        if len(shape) == 1:
            g = self.choice([4, 6, f])
            forms.append(lambda: f"torch.addmm({self.param('bias', f'0.1 * torch.randn({g})')}, {v}, "
                                 f"{self.param('m', f'0.3 * torch.randn({f}, {g})')})")
        expr = self.choice(forms)()
        feats = {"param_operand"} if "self." in expr else {"constant"}
        return _Candidate((f"{t} = {expr}",), feats, (t,))

    def s_out_kwarg(self) -> _Candidate | None:
        if not self.ok("out_kwarg"):
            return None
        v = self.pick()
        w = self.partner(v) or v
        t = self.fresh()
        op = self.choice([f"torch.add({v}, {w}, out={t})", f"torch.mul({v}, 2.0, out={t})",
                          f"torch.sigmoid({v}, out={t})", f"torch.clamp({v}, -0.5, 0.5, out={t})"])
        return _Candidate((f"{t} = torch.empty_like({v})", op), {"out_kwarg", "torch_fn"}, (t,))

    def s_inplace(self) -> _Candidate | None:
        v = self.pick(self.writable)
        if v is None:
            return None
        w = self.partner(v, other_storage=True) if self.rng.random() < 0.5 else None
        t = self.fresh()
        kind = self.choice(["alias", "alias", "method", "functional", "view"])
        attribute = v in self.attribute_vars  # `v = x.mT`: a torch.fx Attribute proxy when traced
        if kind == "alias" and self.ok("inplace_alias"):
            if attribute and not self.ok("inplace_attribute"):
                return None
            op = self.choice(["+=", "-=", "*=", "/="])
            rhs = w if w is not None else self.choice(["1.0", "0.5", "2"])
            if op in ("*=", "/=") and w is not None:
                rhs = f"({w}.sigmoid() + 0.5)"
            feats = {"inplace_alias", "operator"} | ({"inplace_attribute"} if attribute else set())
            return _Candidate((f"{t} = {v}", f"{t} {op} {rhs}"), feats, (t,))
        if kind == "method" and self.ok("inplace_method"):
            forms = [f"{v}.add_(1.0)", f"{v}.mul_(0.5)", f"{v}.clamp_(-1.0, 1.0)", f"{v}.relu_()", f"{v}.sigmoid_()",
                     f"torch.relu_({v})", f"{v}.masked_fill_({v} > 1.0, 1.0)", f"{v}.tanh_()", f"{v}.abs_()",
                     f"{v}.neg_()", f"{v}.div_(2)", f"{v}.pow_(2)", f"{v}.exp_()", f"{v}.clamp_min_(0.0)",
                     f"{v}.sub_(0.5, alpha=2)", f"{v}.fill_(0.25)", f"{v}.zero_()", f"torch.sigmoid_({v})",
                     f"torch.exp_({v}.clamp_(max=2.0))", f"{v}.square_()"]
            if w is not None:
                forms += [f"{v}.add_({w}, alpha=2)", f"{v}.mul_({w})", f"{v}.sub_({w})", f"{v}.copy_({w})",
                          f"{v}.addcmul_({w}, {w}, value=0.5)", f"{v}.lerp_({w}, 0.5)", f"{v}.clamp_(max={w})"]
            expr = self.choice(forms)
            if self.rng.random() < 0.5:
                return _Candidate((f"{t} = {expr}",), {"inplace_method"}, (t,))
            return _Candidate((expr, f"{t} = {v}"), {"inplace_method"}, (t,), attribute=(t,) if attribute else ())
        if kind == "functional" and self.ok("inplace_functional"):
            if self.rng.random() < 0.3 and self.ok("module"):
                mod, feats = self.module("act_ip", self.choice(["nn.ReLU(inplace=True)", "nn.Hardtanh(inplace=True)",
                                                                 "nn.LeakyReLU(0.1, inplace=True)", "nn.SiLU(inplace=True)",
                                                                 "nn.Dropout(0.2, inplace=True)"]), 0.6)
                return _Candidate((f"{t} = {mod}({v})",), feats | {"inplace_functional"}, (t,))
            expr = self.choice([
                f"F.relu({v}, inplace=True)", f"F.leaky_relu({v}, 0.1, inplace=True)", f"F.hardtanh({v}, inplace=True)",
                f"F.elu({v}, inplace=True)", f"F.dropout({v}, 0.3, self.training, inplace=True)", f"F.relu_({v})",
                f"F.elu_({v}, 0.5)", f"F.leaky_relu_({v}, 0.2)", f"F.hardtanh_({v}, -0.5, 0.5)", f"torch.selu_({v})",
                f"torch.celu_({v}, 1.5)", f"torch.threshold_({v}, 0.0, -0.5)", f"F.threshold({v}, 0.1, 0.0, True)",
                f"F.silu({v}, inplace=True)", f"F.hardswish({v}, True)", f"F.relu6({v}, inplace=True)",
                f"F.mish({v}, inplace=True)", f"F.selu({v}, True)", f"F.celu({v}, 1.0, True)",
                f"F.rrelu({v}, training=self.training, inplace=True)", f"F.rrelu_({v}, 0.1, 0.2, self.training)",
                f"F.hardsigmoid({v}, inplace=True)", f"F.dropout({v}, p=0.2, training=self.training, inplace=True)",
            ] + ([f"F.alpha_dropout({v}, 0.2, self.training, True)",
                  f"F.feature_alpha_dropout({v}, 0.2, self.training, inplace=True)"]
                 if self.ok("inplace_alpha_dropout") else []))
            feats = {"inplace_functional", "functional"} | ({"dropout"} if "dropout" in expr else set())
            if "alpha_dropout" in expr:
                feats.add("inplace_alpha_dropout")
            if "dropout" in expr and not self.ok("dropout"):
                return None
            return _Candidate((f"{t} = {expr}",), feats, (t,))
        if kind == "view" and self.ok("inplace_view"):
            views = [f"{v}.narrow(-1, 0, {max(1, self.shape(v)[-1] // 2)})", f"{v}.unsqueeze(1)", f"{v}[:, 0]",
                     f"{v}.transpose(1, -1)", f"{v}.view({v}.size(0), -1)", f"{v}[:, 1:]", f"{v}.flatten(1)",
                     f"torch.flatten({v}, 1)", f"{v}[..., ::2]", f"{v}.select(1, 0)", f"{v}.chunk(2, dim=1)[0]",
                     f"{v}.detach()", f"{v}.view_as({v})", f"{v}.reshape(-1)", f"{v}.mT", f"{v}.data", f"{v}.real", f"{v}.t()" if len(self.shape(v)) == 1
                     else f"{v}.movedim(1, -1)", f"{v}.squeeze(-1)" if self.shape(v)[-1] == 1 else f"{v}.unflatten(1, ({self.shape(v)[0]}, 1))"]
            view = self.choice(views)
            op = self.choice([f"{t}.mul_(2.0)", f"{t} += 1.0", f"{t}.zero_()", f"{t}.clamp_(max=0.5)", f"{t}.sub_(0.25)",
                              f"{t}.relu_()", f"F.relu({t}, inplace=True)", f"{t}.copy_({t}.tanh())", f"{t} *= 0.5"])
            feats = {"inplace_view"}
            if _ATTRIBUTE.search(view) and "=" in op.split("(")[0]:
                if not self.ok("inplace_attribute"):
                    return None
                feats.add("inplace_attribute")
            # the view is temporary (it may not be batch-leading); the modified base is the value
            u = self.fresh()
            return _Candidate((f"{t} = {view}", op, f"{u} = {v}"), feats, (u,), attribute=(u,) if attribute else ())
        return None

    def s_shape(self) -> _Candidate | None:
        v = self.pick()
        shape = self.shape(v)
        r = len(shape) + 1
        t = self.fresh()
        forms = [
            ({"reshape"}, f"{v}.flatten(1)"), ({"reshape", "torch_fn"}, f"torch.flatten({v}, 1)"),
            ({"reshape", "torch_fn"}, f"torch.flatten({v}, start_dim=2)"), ({"reshape"}, f"{v}.flatten(-2)"),
            ({"reshape", "shape_read"}, f"{v}.reshape({v}.shape[0], -1)"), ({"reshape"}, f"{v}.transpose(-1, -2)"),
            ({"reshape", "shape_read"}, f"{v}.view({v}.size(0), -1)"), ({"reshape", "shape_read"}, f"{v}.view(len({v}), -1)"),
            ({"reshape", "shape_read"}, f"{v}.reshape({v}.size(0), 2, -1)"), ({"reshape"}, f"{v}.permute(0, 2, 1)"),
            ({"reshape"}, f"{v}.permute(0, 2, 3, 1)"), ({"reshape"}, f"{v}.unsqueeze(1)"), ({"reshape"}, f"{v}.unsqueeze(-1)"),
            ({"reshape"}, f"{v}.contiguous()"), ({"reshape"}, f"{v}.squeeze(1)"), ({"reshape"}, f"{v}.movedim(1, -1)"),
            ({"reshape"}, f"{v}.unflatten(-1, (2, -1))"), ({"reshape", "torch_fn"}, f"torch.transpose({v}, 1, 2)"),
            ({"reduction", "method"}, f"{v}.mean(dim=1)"), ({"reduction", "method"}, f"{v}.sum(-1)"),
            ({"reduction", "torch_fn"}, f"torch.max({v}, dim=-1)[0]"), ({"reduction", "method"}, f"{v}.max(dim=1).values"),
            ({"reduction", "method"}, f"{v}.min(-1).values"), ({"reduction", "torch_fn"}, f"torch.amax({v}, dim=(-1, -2))"),
            ({"reduction", "method"}, f"{v}.sum(-1, keepdim=True)"), ({"reduction", "method"}, f"{v}.amax(dim=-1, keepdim=True)"),
            ({"reduction", "torch_fn"}, f"torch.sum({v}, dim=1, keepdim=True)"),
            ({"reduction", "torch_fn"}, f"torch.std({v}, dim=1, keepdim=True)"),
            ({"reshape", "method"}, f"{v}.chunk(2, dim=-1)[1]"), ({"reshape", "torch_fn"}, f"torch.split({v}, 2, -1)[0]"),
            ({"reshape"}, f"{v}[..., ::2]"), ({"reshape"}, f"{v}[:, 1:]"), ({"reshape"}, f"{v}[:, None]"),
            ({"reshape"}, f"{v}[:, ..., :1]"), ({"reshape"}, f"{v}.select(1, 0)"),
            ({"reshape", "method"}, f"{v}.narrow(1, 0, 1)"), ({"reshape", "method"}, f"{v}.unbind(1)[0]"),
            ({"reshape"}, f"{v}.expand(-1, " + ", ".join(str(d) if d != 1 else "4" for d in shape) + ")"),
            ({"reshape"}, f"{v}.expand_as(torch.cat([{v}, {v}], dim=-1))"),
            ({"reshape", "method"}, f"{v}.repeat(1, " + ", ".join(["1"] * (r - 2) + ["2"]) + ")"),
            ({"reshape", "torch_fn"}, f"torch.repeat_interleave({v}, 2, dim=-1)"),
            ({"reshape", "torch_fn"}, f"torch.tile({v}, (1, 2))"),
            ({"reshape", "torch_fn"}, f"torch.gather({v}, -1, {v}.argsort(-1))"),
            ({"reshape", "torch_fn"}, f"torch.index_select({v}, -1, torch.tensor([0, 0, 1]))"),
            ({"reshape", "torch_fn"}, f"torch.tril({v})"), ({"reshape", "method"}, f"{v}.triu(1)"),
            ({"reshape", "method"}, f"{v}.sort(dim=-1).values"), ({"reshape", "torch_fn"}, f"torch.topk({v}, 2).values"),
            ({"reshape", "method"}, f"{v}.cummax(1)[0]"), ({"reshape", "torch_fn"}, f"torch.diff({v}, dim=-1)"),
            ({"reshape", "torch_fn"}, f"torch.einsum('bi...,bj...->bij', {v}, {v})"),
            ({"reshape"}, f"{v}.mT"), ({"reshape"}, f"{v}.data"), ({"reshape"}, f"{v}.real"),
            ({"reduction", "method"}, f"{v}.max(-1, keepdim=True).values"),
        ]
        if self.ids is not None and self.ok("ids_in"):
            forms.append(({"reshape", "ids_in"}, f"{v}[:, {self.ids}[0] % {shape[0]}]"))
        feats, expr = self.choice([f for f in forms if all(self.ok(x) for x in f[0])])
        return _Candidate((f"{t} = {expr}",), feats, (t,), attribute=(t,) if _ATTRIBUTE.search(expr) else ())

    def s_shape_read(self) -> _Candidate | None:
        if not self.ok("shape_read"):
            return None
        v = self.pick()
        shape = self.shape(v)
        t = self.fresh()
        dims = ", ".join(str(d) for d in shape)
        forms = [
            (f"h = {v}.size(-1)", f"{t} = {v} * h ** -0.5"),
            (f"{t} = {v} + torch.zeros_like({v})",),
            (f"{t} = {v} - {v}.new_zeros({v}.shape)",),
            (f"{t} = {v} * torch.ones({v}.size(0), {dims})",),
            (f"{t} = {v} / {v}.shape[-1]",),
            (f"n, d = {v}.shape[0], {v}.shape[-1]", f"{t} = {v}.reshape(n, -1, d).mean(1) * d"),
            (f"{t} = {v} + torch.arange({v}.size(-1))",),
            (f"{t} = {v} * {v}.new_full(({v}.size(-1),), 0.5)",),
            (f"{t} = {v}.view(-1, {v}.size(-1)).softmax(-1).view_as({v})",),
            (f"{t} = {v} + {v}.numel() * 0.01",),
            (f"{t} = {v} * torch.randn({v}.shape).abs().clamp(max=0.0)",),
            (f"{t} = {v}.new_tensor(2.0) * {v}",),
        ]
        return _Candidate(self.choice(forms), {"shape_read"}, (t,))

    def s_cat(self) -> _Candidate | None:
        if not self.ok("cat"):
            return None
        v = self.pick()
        w = self.partner(v, same_shape=False) or v
        t = self.fresh()
        expr = self.choice([f"torch.cat([{v}, {w}], dim=-1)", f"torch.concat(({v}, {w}), 1)",
                            f"torch.stack([{v}, {w}], dim=1)", f"torch.cat([{v}, {w}])[:{v}.size(0)]",
                            f"torch.stack([{v}, {w}], -1).sum(-1)", f"torch.cat([{v}, {v}.flip(-1)], dim=-1)",
                            f"torch.cat([{v}] * 2, dim=1)", f"torch.hstack([{v}, {w}])", f"torch.dstack([{v}, {w}])"])
        return _Candidate((f"{t} = {expr}",), {"cat", "torch_fn"}, (t,))

    def s_linear(self) -> _Candidate | None:
        v = self.pick()
        shape = self.shape(v)
        fin = shape[-1]
        fout = self.choice([4, 6, 8, fin])
        t = self.fresh()
        kind = self.rng.randrange(9)
        if kind == 0 and self.ok("module"):
            ctor = self.choice([f"nn.Linear({fin}, {fout})", f"nn.Linear({fin}, {fout}, bias=False)"])
            mod, feats = self.module("fc", ctor, 0.6)
            return _Candidate((f"{t} = {mod}({v})",), feats, (t,))
        if kind == 1 and self.ok("param_functional"):
            w = self.param("w", f"torch.randn({fout}, {fin}) * 0.3")
            b = self.param("b", f"torch.randn({fout}) * 0.1") if self.rng.random() < 0.7 else "None"
            expr = self.choice([f"F.linear({v}, {w}, {b})", f"F.linear({v}, {w}, bias={b})",
                                f"F.linear(input={v}, weight={w}, bias={b})"])
            return _Candidate((f"{t} = {expr}",), {"param_functional", "functional"}, (t,))
        if kind == 2 and self.ok("matmul"):
            w = self.param("m", f"torch.randn({fin}, {fout}) * 0.3")
            expr = self.choice([f"{v} @ {w}", f"torch.matmul({v}, {w})", f"{v}.matmul({w})",
                                f"F.linear({v}, {w}.t())", f"torch.einsum('...i,io->...o', {v}, {w})"])
            feats = {"matmul"} | ({"functional"} if "F." in expr else set())
            return _Candidate((f"{t} = {expr}",), feats, (t,))
        if kind == 3 and self.ok("matmul"):
            w = self.partner(v) or v
            expr = self.choice([f"{v} @ {w}.transpose(-1, -2)", f"torch.bmm({v}, {w}.transpose(1, 2))",
                                f"torch.softmax({v} @ {w}.transpose(1, 2) * {fin ** -0.5:.4f}, dim=-1) @ {w}",
                                f"torch.baddbmm({v}, {v}, {w}.transpose(1, 2) @ {w}, beta=0.5, alpha=0.1)",
                                f"{v}.unsqueeze(-1) @ {w}.unsqueeze(-2)", f"torch.mm({v}, {w}.t())",
                                f"F.scaled_dot_product_attention({v}, {w}, {w})",
                                f"F.scaled_dot_product_attention({v}, {v}, {w}, is_causal=True)",
                                f"F.scaled_dot_product_attention({v}, {w}, {v}, dropout_p=0.5 if self.training else 0.0)"])
            if "self.training" in expr and not self.ok("training_constant"):
                return None
            feats = {"matmul"} | ({"training_constant"} if "self.training" in expr else set())
            return _Candidate((f"{t} = {expr}",), feats, (t,))
        if kind == 4 and self.ok("helper") and fout == fin:
            cls = self.choice(["Residual", "Stack", "Gate", "Scale"])
            if cls == "Gate" and not self.ok("dropout"):
                cls = "Residual"
            self.helper(cls)
            ctor = {"Residual": f"Residual({fin})", "Stack": f"Stack({fin}, 2)", "Gate": "Gate(0.25)",
                    "Scale": f"Scale({fin})"}[cls]
            mod, feats = self.module(cls.lower(), ctor, 0.6)
            return _Candidate((f"{t} = {mod}({v})",), feats | {"helper"}, (t,))
        if kind == 5 and self.ok("helper", "reused_module"):
            inner = [n for n, ctor in self.attrs.items() if f"Residual({fin})" in ctor or f"Stack({fin}, 2)" in ctor]
            if not inner:
                return None
            name = self.choice(inner)
            sub = ".fc" if "Residual" in self.attrs[name] else ".layers[1]"
            return _Candidate((f"{t} = self.{name}{sub}({v})",), {"helper", "reused_module", "module"}, (t,))
        if kind == 6 and self.ok("sequential", "module"):
            ctor = self.choice([f"nn.Sequential(nn.Linear({fin}, {fout}), nn.ReLU(), nn.Linear({fout}, {fin}))",
                                f"nn.Sequential(nn.LayerNorm({fin}), nn.Dropout(0.1), nn.GELU())",
                                f"nn.Sequential(nn.Linear({fin}, {fin}), nn.Sequential(nn.Tanh(), nn.Identity()))"])
            mod, feats = self.module("seq", ctor, 0.6)
            idx = self.choice(["", "", "[0]", "[-1]"])
            return _Candidate((f"{t} = {mod}{idx}({v})",), feats | {"sequential"}, (t,))
        if kind == 7 and self.ok("module"):
            ctor = f"nn.ModuleDict({{'a': nn.Linear({fin}, {fout}), 'b': nn.Tanh()}})"
            mod, feats = self.module("heads", ctor, 0.6)
            return _Candidate((f"{t} = {mod}['b']({mod}['a']({v}))",), feats | {"sequential"}, (t,))
        if kind == 8 and self.ok("param_functional") and len(shape) == 1:
            w = self.param("bw", f"torch.randn({fout}, {fin}, {fin}) * 0.2")
            b = self.param("bb", f"torch.randn({fout}) * 0.1")
            return _Candidate((f"{t} = F.bilinear({v}, {v}.tanh(), {w}, {b})",), {"param_functional", "functional"}, (t,))
        return None

    def s_norm(self) -> _Candidate | None:
        v = self.pick()
        shape = self.shape(v)
        f, c = shape[-1], shape[0]
        t = self.fresh()
        kind = self.rng.randrange(8)
        if kind == 0 and self.ok("param_functional"):
            w = self.param("ln_w", f"1.0 + 0.1 * torch.randn({f})")
            b = self.param("ln_b", f"0.1 * torch.randn({f})")
            expr = self.choice([f"F.layer_norm({v}, ({f},), {w}, {b})", f"F.layer_norm({v}, [{f}], weight={w}, eps=1e-3)",
                                f"F.layer_norm({v}, ({f},), {w}, {b}, 1e-6)"])
            return _Candidate((f"{t} = {expr}",), {"param_functional", "norm"}, (t,))
        if kind == 1 and self.ok("shape_read"):
            return _Candidate((f"{t} = F.layer_norm({v}, {v}.shape[-1:])",), {"functional", "norm", "shape_read"}, (t,))
        if kind == 2 and self.ok("module"):
            ctor = self.choice([f"nn.LayerNorm({f})", f"nn.LayerNorm({f}, elementwise_affine=False)",
                                f"nn.LayerNorm({f}, bias=False, eps=1e-3)", f"nn.RMSNorm({f})"])
            mod, feats = self.module("ln", ctor, 0.5)
            return _Candidate((f"{t} = {mod}({v})",), feats | {"norm"}, (t,))
        if kind == 3 and self.ok("batch_norm_train", "param_functional"):
            rm, rv = self.buffer("rm", f"torch.zeros({c})"), self.buffer("rv", f"torch.ones({c})")
            w = self.param("bn_w", f"1.0 + 0.1 * torch.randn({c})")
            b = self.param("bn_b", f"0.1 * torch.randn({c})")
            expr = self.choice([f"F.batch_norm({v}, {rm}, {rv}, {w}, {b}, self.training)",
                                f"F.batch_norm({v}, {rm}, {rv}, weight={w}, bias={b}, training=self.training, momentum=0.3)",
                                f"F.batch_norm({v}, {rm}, {rv}, {w}, {b}, self.training, 0.1, 1e-3)",
                                f"F.batch_norm({v}, {rm}, {rv}, training=self.training)",
                                f"F.batch_norm({v}, {rm}, {rv}, {w}, {b}, self.training, None)",
                                f"F.batch_norm({v}, None, None, {w}, {b}, True)",
                                f"F.batch_norm({v}, {rm}, {rv}, {w}, {b}, False)"])
            return _Candidate((f"{t} = {expr}",), {"param_functional", "norm", "batch_norm_train"}, (t,))
        if kind == 4 and self.ok("module", "batch_norm_train"):
            r = len(shape) + 1
            cls = "nn.BatchNorm2d" if r == 4 else "nn.BatchNorm1d"
            ctor = self.choice([f"{cls}({c})", f"{cls}({c}, momentum=None)", f"{cls}({c}, affine=False)",
                                f"{cls}({c}, track_running_stats=False)", f"{cls}({c}, eps=1e-3, momentum=0.5)"])
            mod, feats = self.module("bn", ctor, 0.5)
            return _Candidate((f"{t} = {mod}({v})",), feats | {"norm", "batch_norm_train"}, (t,))
        if kind == 5 and self.ok("param_functional"):
            g = self.choice([1, 2]) if c % 2 == 0 else 1
            w = self.param("gn_w", f"1.0 + 0.1 * torch.randn({c})")
            b = self.param("gn_b", f"0.1 * torch.randn({c})")
            return _Candidate((f"{t} = F.group_norm({v}, {g}, {w}, {b})",), {"param_functional", "norm"}, (t,))
        if kind == 6 and self.ok("module"):
            ctor = self.choice([f"nn.GroupNorm(1, {c})", f"nn.InstanceNorm1d({c}, affine=True)",
                                f"nn.InstanceNorm2d({c})", f"nn.LocalResponseNorm(2)"])
            mod, feats = self.module("gn", ctor, 0.5)
            return _Candidate((f"{t} = {mod}({v})",), feats | {"norm"}, (t,))
        if kind == 7 and self.ok("param_functional"):
            w = self.param("in_w", f"1.0 + 0.1 * torch.randn({c})")
            b = self.param("in_b", f"0.1 * torch.randn({c})")
            expr = self.choice([f"F.instance_norm({v}, weight={w}, bias={b})",
                                f"F.prelu({v}, {self.param('pw', f'torch.full(({c},), 0.2)')})",
                                f"F.prelu({v}, {self.param('pw', 'torch.tensor([0.1])')})"])
            return _Candidate((f"{t} = {expr}",), {"param_functional", "norm"}, (t,))
        return None

    def s_conv(self) -> _Candidate | None:
        v = self.pick(lambda n: len(self.shape(n)) in (2, 3))
        if v is None or not self.ok("conv"):
            return None
        shape = self.shape(v)
        c = shape[0]
        t = self.fresh()
        two_d = len(shape) == 3
        cout = self.choice([2, 3, 4, c])
        if self.rng.random() < 0.5 and self.ok("module"):
            if two_d:
                ctor = self.choice([f"nn.Conv2d({c}, {cout}, 3, padding=1)", f"nn.Conv2d({c}, {cout}, 1, bias=False)",
                                    f"nn.Conv2d({c}, {cout}, 3, stride=2, padding=1)",
                                    f"nn.Conv2d({c}, {c}, 3, padding='same', groups={c})",
                                    f"nn.Conv2d({c}, {cout}, 3, padding=1, padding_mode='reflect')",
                                    f"nn.Conv2d({c}, {cout}, 2, dilation=2, padding=1)",
                                    f"nn.ConvTranspose2d({c}, {cout}, 2, stride=2)",
                                    f"nn.ConvTranspose2d({c}, {cout}, 3, padding=1, output_padding=0)",
                                    f"nn.MaxPool2d(2)", f"nn.AvgPool2d(3, stride=1, padding=1)", f"nn.Upsample(scale_factor=2)",
                                    f"nn.AdaptiveAvgPool2d((1, 1))", f"nn.Dropout2d(0.3)", f"nn.PixelUnshuffle(2)",
                                    f"nn.ZeroPad2d(1)", f"nn.Flatten()", f"nn.Flatten(2)", f"nn.Unflatten(1, ({c}, 1))"])
            else:
                ctor = self.choice([f"nn.Conv1d({c}, {cout}, 3, padding=1)", f"nn.Conv1d({c}, {cout}, 2)",
                                    f"nn.Conv1d({c}, {cout}, 3, padding='same', padding_mode='circular')",
                                    f"nn.ConvTranspose1d({c}, {cout}, 2, stride=2)", f"nn.MaxPool1d(2)",
                                    f"nn.AvgPool1d(2, ceil_mode=True)", f"nn.AdaptiveMaxPool1d(2)", f"nn.Flatten()",
                                    f"nn.Upsample(scale_factor=2, mode='linear')", f"nn.ReflectionPad1d(1)"])
            mod, feats = self.module("conv", ctor, 0.6)
            return _Candidate((f"{t} = {mod}({v})",), feats | {"conv"}, (t,))
        if not self.ok("param_functional"):
            return None
        k = self.choice([1, 2, 3])
        if two_d:
            kind = self.rng.randrange(5)
            if kind == 0:
                w = self.param("cw", f"torch.randn({cout}, {c}, {k}, {k}) * 0.2")
                b = self.param("cb", f"torch.randn({cout}) * 0.1")
                expr = self.choice([f"F.conv2d({v}, {w}, {b}, padding={k // 2})", f"F.conv2d({v}, {w}, {b}, 2, 1)",
                                    f"F.conv2d({v}, {w}, bias={b}, stride=1, padding='same')", f"F.conv2d({v}, {w})",
                                    f"F.conv2d({v}, {w}, None, 1, 1, 2)"])
            elif kind == 1:
                w = self.param("cw", f"torch.randn({c}, 1, 3, 3) * 0.2")
                expr = f"F.conv2d({v}, {w}, padding=1, groups={c})"
            elif kind == 2:
                w = self.param("ctw", f"torch.randn({c}, {cout}, 2, 2) * 0.2")
                b = self.param("ctb", f"torch.randn({cout}) * 0.1")
                expr = self.choice([f"F.conv_transpose2d({v}, {w}, {b}, stride=2)",
                                    f"F.conv_transpose2d({v}, {w}, stride=1, padding=0)"])
            elif kind == 3:
                expr = f"F.conv2d({v}, torch.ones({c}, 1, 1, 1), groups={c})"
            else:
                expr = f"F.conv2d({v}, {self.param('cw', f'torch.randn({cout}, {c}, 3, 3) * 0.2')} * 2.0, padding=1)"
        else:
            w = self.param("cw", f"torch.randn({cout}, {c}, {k}) * 0.2")
            b = self.param("cb", f"torch.randn({cout}) * 0.1")
            expr = self.choice([f"F.conv1d({v}, {w}, {b}, padding={k // 2})", f"F.conv1d({v}, {w}, {b}, 1, 'same')",
                                f"F.conv1d({v}, {w}, stride=2)"])
        return _Candidate((f"{t} = {expr}",), {"conv", "param_functional"}, (t,))

    def s_recurrent(self) -> _Candidate | None:
        v = self.pick(lambda n: len(self.shape(n)) in (1, 2) and self.shape(n)[-1] <= 16)
        if v is None:
            return None
        shape = self.shape(v)
        f = shape[-1]
        h = self.choice([4, 6, 8])
        t, u = self.fresh(), self.fresh()
        if len(shape) == 1:  # cells on (B, F)
            if not self.ok("recurrent"):
                return None
            kind = self.rng.randrange(3)
            if kind == 0:
                mod, feats = self.module("cell", f"nn.LSTMCell({f}, {h})", 0.6)
                return _Candidate((f"{t}, {u} = {mod}({v})",), feats | {"recurrent"}, (t, u))
            if kind == 1:
                w = self.partner(v)
                mod, feats = self.module("cell", f"nn.GRUCell({f}, {f}, bias={self.choice([True, False])})", 0.6)
                hx = f", {w}" if w is not None else ""
                return _Candidate((f"{t} = {mod}({v}{hx})",), feats | {"recurrent"}, (t,))
            mod, feats = self.module("cell", f"nn.RNNCell({f}, {h}, nonlinearity='{self.choice(['tanh', 'relu'])}')", 0.6)
            return _Candidate((f"{t} = {mod}({v}, torch.zeros({v}.size(0), {h}))",), feats | {"recurrent"}, (t,))
        kind = self.rng.randrange(7)
        if kind <= 2 and self.ok("recurrent"):
            layers = self.choice([1, 1, 2])
            bidir = self.choice([False, True])
            extra = ""
            if layers > 1 and self.rng.random() < 0.5:
                extra += ", dropout=0.25"
            if self.rng.random() < 0.2:
                extra += ", bias=False"
            cls = ["nn.LSTM", "nn.GRU", "nn.RNN"][kind]
            if cls == "nn.LSTM" and self.rng.random() < 0.2:
                extra += f", proj_size={h - 2}"
            if cls == "nn.RNN" and self.rng.random() < 0.5:
                extra += ", nonlinearity='relu'"
            batch_first = self.rng.random() < 0.7
            ctor = f"{cls}({f}, {h}, num_layers={layers}, batch_first={batch_first}, bidirectional={bidir}{extra})"
            mod, feats = self.module("rnn", ctor, 0.5)
            x_in = v if batch_first else f"{v}.transpose(0, 1)"
            back = "" if batch_first else ".transpose(0, 1)"
            state = "(hn, cn)" if cls == "nn.LSTM" else "hn"
            form = self.rng.randrange(3)
            if form == 0:
                lines = (f"{t} = {mod}({x_in})[0]{back}",)
                pool: tuple[str, ...] = (t,)
            elif form == 1:
                lines = (f"{t}, {state} = {mod}({x_in})", f"{t} = {t}{back}", f"{u} = hn.transpose(0, 1).flatten(1)")
                pool = (t, u)
            else:
                hsize = h - 2 if "proj_size" in extra else h
                h0 = f"{v}.new_zeros({layers * (2 if bidir else 1)}, {v}.size(0), {hsize})"
                init = f"({h0}, torch.zeros({layers * (2 if bidir else 1)}, {v}.size(0), {h}))" \
                    if cls == "nn.LSTM" else h0
                lines = (f"{t}, _ = {mod}({x_in}, {init})", f"{t} = {t}{back}")
                pool = (t,)
            return _Candidate(lines, feats | {"recurrent"}, pool)
        if kind in (3, 4) and self.ok("attention"):
            heads = self.choice([n for n in (1, 2, 4) if f % n == 0])
            extra = self.choice(["", ", dropout=0.2", ", bias=False", ", add_bias_kv=True", ", kdim=3, vdim=5"])
            batch_first = self.rng.random() < 0.7
            ctor = f"nn.MultiheadAttention({f}, {heads}, batch_first={batch_first}{extra})"
            mod, feats = self.module("mha", ctor, 0.5)
            w = self.partner(v) or v
            q, kv = (v, w) if batch_first else (f"{v}.transpose(0, 1)", f"{w}.transpose(0, 1)")
            if "kdim" in extra:
                k_in, v_in = f"{kv}[..., :3]", f"torch.cat([{kv}, {kv}], -1)[..., :5]"
            else:
                k_in = v_in = kv
            back = "" if batch_first else ".transpose(0, 1)"
            call = self.choice(["", ", need_weights=False", ", average_attn_weights=False",
                                f", attn_mask=torch.ones({shape[0]}, {shape[0]}).triu(1).bool()",
                                f", key_padding_mask=torch.zeros({v}.size(0), {shape[0]}, dtype=torch.bool)"])
            if "average_attn_weights=False" in call or "need_weights=False" in call or self.rng.random() < 0.5:
                lines = (f"{t} = {mod}({q}, {k_in}, {v_in}{call})[0]{back}",)
                pool = (t,)
            else:
                lines = (f"{t}, {u} = {mod}({q}, {k_in}, {v_in}{call})", f"{t} = {t}{back}")
                pool = (t, u)
            return _Candidate(lines, feats | {"attention"}, pool)
        if kind in (5, 6) and self.ok("transformer") and f % 2 == 0:
            first = self.choice([False, True])
            act = self.choice(["'relu'", "'gelu'", "F.gelu"])
            if kind == 5:
                ctor = (f"nn.TransformerEncoderLayer({f}, 2, dim_feedforward=16, dropout=0.1, activation={act}, "
                        f"batch_first=True, norm_first={first})")
                if self.rng.random() < 0.3:
                    ctor = f"nn.TransformerEncoder({ctor}, num_layers=2, enable_nested_tensor=False)"
                mod, feats = self.module("enc", ctor, 0.5)
                call = self.choice([f"{v}", f"{v}, src_mask=torch.ones({shape[0]}, {shape[0]}).triu(1).bool()",
                                    f"{v}, src_key_padding_mask=torch.zeros({v}.size(0), {shape[0]}, dtype=torch.bool)"])
            else:
                ctor = (f"nn.TransformerDecoderLayer({f}, 2, dim_feedforward=8, dropout=0.1, batch_first=True, "
                        f"norm_first={first})")
                mod, feats = self.module("dec", ctor, 0.5)
                call = f"{v}, {self.partner(v, same_shape=False) or v}"
            return _Candidate((f"{t} = {mod}({call})",), feats | {"transformer"}, (t,))
        return None

    def s_embedding(self) -> _Candidate | None:
        if self.ids is None or not self.ok("embedding"):
            return None
        e = self.choice([4, 6, 8])
        t = self.fresh()
        kind = self.rng.randrange(3)
        if kind == 0 and self.ok("module"):
            mod, feats = self.module("emb", self.choice([f"nn.Embedding({_VOCAB}, {e})",
                                                         f"nn.Embedding({_VOCAB}, {e}, padding_idx=0)"]), 0.6)
            return _Candidate((f"{t} = {mod}({self.ids})",), feats | {"embedding"}, (t,))
        w = self.param("emb_w", f"torch.randn({_VOCAB}, {e})")
        expr = self.choice([f"F.embedding({self.ids}, {w})", f"F.embedding({self.ids}, {w}, padding_idx=1)",
                            f"{w}[{self.ids}]", f"F.one_hot({self.ids}, {_VOCAB}).float() @ {w}"])
        return _Candidate((f"{t} = {expr}",), {"embedding", "param_functional"}, (t,))

    def s_dropout(self) -> _Candidate | None:
        if not self.ok("dropout"):
            return None
        v = self.pick()
        t = self.fresh()
        forms = [f"F.dropout({v}, p=0.25, training=self.training)", f"F.dropout({v}, 0.5, self.training)",
                 f"torch.dropout({v}, 0.2, self.training)", f"F.dropout({v}, 0.1)", f"F.dropout({v}, p=0.3, training=False)",
                 f"F.dropout2d({v}, 0.5, self.training)", f"F.dropout({v}, 0.4, self.training and True)"]
        feats = {"dropout", "functional"}
        if self.ok("dropout_not_training") and self.rng.random() < 0.15:
            forms = [f"F.dropout({v}, p=0.5, training=not self.training)"]
            feats.add("dropout_not_training")
        elif self.ok("module") and self.rng.random() < 0.3:
            mod, mfeats = self.module("drop", self.choice(["nn.Dropout(0.25)", "nn.Dropout(0.5)", "nn.AlphaDropout(0.2)"]),
                                      0.6)
            return _Candidate((f"{t} = {mod}({v})",), mfeats | {"dropout"}, (t,))
        return _Candidate((f"{t} = {self.choice(forms)}",), feats, (t,))

    def s_buffer_update(self) -> _Candidate | None:
        """A forward that updates the model's buffers (running averages, step counters)."""
        if not self.ok("buffer_update"):
            return None
        v = self.pick()
        shape = self.shape(v)
        t = self.fresh()
        kind = self.rng.randrange(5)
        feats = {"buffer_update"}
        if kind == 0:
            ema = self.buffer("ema", f"torch.zeros{tuple(shape)!r}")
            lines = (f"{ema}.mul_(0.9).add_({v}.detach().mean(0), alpha=0.1)", f"{t} = {v} - {ema}")
        elif kind == 1:
            steps = self.buffer("steps", "torch.zeros(())")
            lines = (f"{steps}.add_(1)", f"{t} = {v} * {steps}")
        elif kind == 2:
            last = self.buffer("last", f"torch.zeros{tuple(shape)!r}")
            lines = (f"{t} = {v} + {last}", f"{last}.copy_({v}.detach()[0])")
        elif not self.ok("buffer_assign"):
            return None
        elif kind == 3:  # augmented assignment to the attribute: in place, then rebound
            steps = self.buffer("steps", "torch.zeros(())")
            lines = (f"{steps} += 1", f"{t} = {v} * {steps}")
            feats.add("buffer_assign")
        else:  # the buffer rebound to a new tensor
            ema = self.buffer("ema", f"torch.zeros{tuple(shape)!r}")
            lines = (f"{ema} = {ema} * 0.9 + {v}.detach().mean(0) * 0.1", f"{t} = {v} - {ema}")
            feats.add("buffer_assign")
        return _Candidate(lines, feats, (t,))

    def s_grad_mode(self) -> _Candidate | None:
        """Grad-mode context managers inside ``forward``."""
        if not self.ok("grad_mode"):
            return None
        v = self.pick()
        t = self.fresh()
        lines = self.choice([("with torch.no_grad():", f"    {t} = {v} * 2.0"),
                             ("with torch.set_grad_enabled(False):", f"    {t} = {v}.sigmoid() + {v}"),
                             ("with torch.no_grad():", f"    {t} = F.relu({v})", f"{t} = {t} + {v}")])
        return _Candidate(lines, {"grad_mode"}, (t,))

    def s_item(self) -> _Candidate | None:
        if not self.ok("item"):
            return None
        v = self.pick()
        t = self.fresh()
        expr = self.choice([f"{v} * {v}.abs().max().item()", f"{v} - {v}.mean().item()",
                            f"{v} * {v}.size(-1) / {v}.sum().abs().add(1.0).item()"])
        return _Candidate((f"{t} = {expr}",), {"item"}, (t,))

    def s_spelling(self) -> _Candidate | None:
        """The same ops spelled other ways: keyword arguments, unbound methods, dunders,
        ``operator``, Python builtins, closures and module-level helper functions."""
        v = self.pick()
        w = self.partner(v) or v
        t = self.fresh()
        kind = self.rng.randrange(4)
        if kind == 0 and self.ok("keyword_args"):
            dim = self.choice([-1, 1])
            expr = self.choice([
                f"torch.add(input={v}, other={w}, alpha=2)", f"torch.mul(input={v}, other=0.5)",
                f"{v}.add(other={w})", f"{v}.sub(other={w}, alpha=0.5)", f"torch.cat(tensors=[{v}, {w}], dim={dim})",
                f"torch.stack(tensors=({v}, {w}))[0]", f"F.relu(input={v})", f"F.softmax(input={v}, dim={dim})",
                f"F.gelu(input={v}, approximate='tanh')", f"F.leaky_relu(input={v}, negative_slope=0.3)",
                f"torch.clamp(input={v}, min=-0.5, max=0.5)", f"{v}.clamp(min=-0.5)", f"torch.sigmoid(input={v})",
                f"torch.where(condition={v} > 0, input={v}, other={w})", f"torch.sum(input={v}, dim={dim}, keepdim=True)",
                f"{v}.mean(dim={dim}, keepdim=True)", f"torch.matmul(input={v}, other={w}.transpose(-1, -2))",
                f"F.dropout(input={v}, p=0.2, training=self.training)", f"torch.flatten(input={v}, start_dim=1)",
                f"torch.transpose(input={v}, dim0=1, dim1=-1)", f"F.normalize(input={v}, dim={dim})",
                f"torch.maximum(input={v}, other={w})", f"torch.pow(input={v}, exponent=2)", f"torch.masked_fill(input={v}, mask={v} > 0, value=0.0)",
            ])
            return _Candidate((f"{t} = {expr}",), {"keyword_args"}, (t,))
        if kind == 1 and self.ok("call_spelling"):
            lines = self.choice([
                (f"{t} = {v}.__add__({w})",), (f"{t} = {v}.__rsub__(1.0)",), (f"{t} = {v}.__mul__(2)",),
                (f"{t} = sum([{v}, {w}])",), (f"{t} = sum([{v}, {w}], 1.0)",), (f"{t} = getattr(torch, 'tanh')({v})",),
                (f"{t} = getattr({v}, 'relu')()",), (f"{t} = abs({v})",), (f"{t} = pow({v}, 2)",), (f"{t} = -(-{v})",),
                (f"{t} = +{v}",), (f"f = lambda z: z * 2.0 + 1.0", f"{t} = f({v})"),
                (f"{t} = functools.reduce(operator.add, [{v}, {w}, {v}])",),
                (f"{t} = operator.mul({v}, {w})",), (f"{t} = operator.iadd({v}.clone(), {w})",),
                (f"{t} = torch.stack([{v} * i for i in range(3)]).sum(0)",),
                (f"{t} = torch.reshape({v}, [{v}.shape[0], -1]).reshape({v}.shape) * 2.0",),
            ])
            return _Candidate(lines, {"call_spelling"}, (t,))
        if kind == 2 and self.rng.random() < 0.3 and self.ok("autograd_function", "runtime_assert"):
            # a custom backward (a straight-through estimator), or an assert on tensor data
            if self.rng.random() < 0.5:
                self.helper("RoundSTE")
                return _Candidate((f"{t} = RoundSTE.apply({v})",), {"autograd_function"}, (t,))
            return _Candidate((f'assert torch.isfinite({v}).all(), "not finite"', f"{t} = {v} * 1.5"),
                              {"runtime_assert"}, (t,))
        if kind == 2 and self.ok("helper_function"):
            fn = self.choice(["gelu_gate", "residual_norm"])
            self.helper(fn)
            call = f"gelu_gate({v})" if fn == "gelu_gate" else f"residual_norm({v}, {w})"
            return _Candidate((f"{t} = {call}",), {"helper_function"}, (t,))
        if kind == 3 and self.ok("keyword_args", "module"):
            ctor = self.choice([f"nn.Linear({self.shape(v)[-1]}, 4)", "nn.ReLU()", "nn.Softmax(dim=-1)"])
            mod, feats = self.module("kw", ctor, 0.5)
            return _Candidate((f"{t} = {mod}(input={v})",), feats | {"keyword_args"}, (t,))
        return None

    def s_mixer(self) -> _Candidate | None:
        if not self.ok("helper", "helper_tuple"):
            return None
        v = self.pick()
        w = self.partner(v)
        if w is None:
            return None
        self.helper("Mixer")
        mod, feats = self.module("mix", "Mixer()", 0.5)
        a, b = self.fresh(), self.fresh()
        return _Candidate((f"{a}, {b} = {mod}({v}, {w})",), feats | {"helper", "helper_tuple"}, (a, b))

    def s_optional(self) -> _Candidate | None:
        names = {s.kind: s.name for s in self.specs}
        v = self.pick()
        t = self.fresh()
        if "none" in names:
            m = names["none"]
            return _Candidate((f"{t} = {v}", f"if {m} is not None:", f"    {t} = {t} * {m}"), {"none_in"}, (t,))
        if "default" in names:
            use, feature = self.default_use
            return _Candidate((use.format(v=v, t=t),), {"default_arg", feature}, (t,))
        return None

    def s_training_branch(self) -> _Candidate | None:
        """Python values that depend on ``self.training``: branches, and constants."""
        v = self.pick()
        t = self.fresh()
        forms = []
        if self.ok("training_branch"):
            forms += [("training_branch", ("if self.training:", f"    {t} = {v} * 0.5", "else:", f"    {t} = {v} + 0.5")),
                      ("training_branch", (f"{t} = {v}", "if not self.training:", f"    {t} = torch.tanh({t})"))]
        if self.ok("training_constant"):
            forms += [("training_constant", (f"{t} = {v} * (0.9 if self.training else 1.0)",)),
                      ("training_constant", (f"{t} = F.dropout({v}, p=0.3 if self.training else 0.0, training=True)",))]
        if not forms:
            return None
        feature, lines = self.choice(forms)
        return _Candidate(lines, {feature}, (t,))

    # -- constructs today's tracer refuses ------------------------------------------------
    def s_untraceable(self) -> _Candidate | None:
        kinds = [k for k in sorted(UNTRACEABLE_FEATURES) if self.ok(k)]
        if not kinds:
            return None
        kind = self.choice(kinds)
        v = self.pick()
        r = len(self.shape(v)) + 1
        t = self.fresh()
        if kind == "shape_branch":
            lines = self.choice([
                (f"if {v}.dim() == {r}:", f"    {t} = {v} * 0.5", "else:", f"    {t} = {v} + 0.5"),
                (f"if {v}.size(-1) > 4:", f"    {t} = F.relu({v})", "else:", f"    {t} = torch.tanh({v})"),
                (f"if {v}.shape[1] % 2 == 0:", f"    {t} = {v} - 1.0", "else:", f"    {t} = {v} + 1.0"),
                (f"{t} = {v}", f"if {v}.numel() > 64:", f"    {t} = {t} * 0.5"),
                (f"assert {v}.dim() == {r}, 'rank'", f"{t} = {v} + 1.0"),
                (f"{t} = {v}.flatten(1) if {v}.dim() > 2 else {v}",),
            ])
        elif kind == "shape_loop":
            lines = self.choice([
                (f"{t} = torch.zeros_like({v})", f"for i in range({v}.shape[0]):", f"    {t} = {t} + {v}[i]"),
                (f"{t} = {v}", f"for _ in range({v}.size(-1) // 4):", f"    {t} = torch.tanh({t})"),
            ])
        elif kind == "shape_math":
            lines = self.choice([(f"{t} = {v} / math.sqrt({v}.size(-1))",), (f"{t} = {v} * float({v}.shape[-1])",),
                                 (f"{t} = {v}.view(*{v}.shape)",),
                                 (f"{t} = {v} - {v}.mean(dim=tuple(range(1, {v}.dim())), keepdim=True)",),
                                 (f"{t} = torch.cat([{v}, torch.ones(*{v}.shape[:-1], 1)], dim=-1)",)])
        elif kind == "value_branch":
            lines = self.choice([
                (f"if {v}.sum() > 0:", f"    {t} = {v} * 2.0", "else:", f"    {t} = {v} - 1.0"),
                (f"{t} = {v} * float({v}.abs().max())",),
                (f"{t} = {v} if bool(({v} > 0).any()) else -{v}",),
            ])
        elif kind == "setitem":
            forms = [(f"{t} = {v}.clone()", f"{t}[:, 0] = 0.0"), (f"{t} = {v}.clone()", f"{t}[{t} > 0.5] = 0.5"),
                     (f"{t} = {v}.clone()", f"mask = {v} > 0", f"{t}[mask] = {v}[mask] * 2.0"),
                     # bounds read from a shape, inside a slice of the key
                     (f"{t} = {v}.clone()", f"{t}[:, :{v}.size(1) // 2] = 0.0"),
                     (f"{t} = {v}.clone()", f"{t}[..., {v}.shape[-1] - 1:] *= 2.0")]
            if self.writable(v):
                forms += [(f"{v}[:, 0] = 1.0", f"{t} = {v}"), (f"{v}[:, :1] += 1.0", f"{t} = {v}")]
            lines = self.choice(forms)
        elif kind == "unbound_method":  # torch.Tensor.add(x, y): the C descriptor rejects a Proxy
            w = self.partner(v) or v
            lines = self.choice([(f"{t} = torch.Tensor.add({v}, {w})",), (f"{t} = torch.Tensor.sigmoid({v})",)])
        elif kind == "tensor_iter":
            lines = self.choice([(f"{t} = torch.stack([r * 0.5 for r in {v}.unbind(1)], 1)",),
                                 (f"{t} = {v} + sum({v}.unbind(1)).unsqueeze(1)",)])
        else:  # helper_branch: the refused line is inside a helper submodule
            cls = self.choice(_UNTRACEABLE_HELPERS)
            self.helper(cls)
            ctor = "ShapeGate()" if cls == "ShapeGate" else f"RankGate({self.shape(v)[-1]})"
            mod, feats = self.module("gate", ctor, 0.5)
            if v in self.attribute_vars:  # matters with on_untraceable="leaf" (finding F10)
                feats.add("attribute_arg")
            return _Candidate((f"{t} = {mod}({v})",), feats | {"helper", kind}, (t,))
        return _Candidate(lines, {kind}, (t,), untraceable=True)

    # -- outputs ------------------------------------------------------------------------
    def output(self) -> tuple[str, frozenset[str], tuple[str, ...]]:
        names = [self.pool[-1]]
        k = self.choice([1, 1, 2, 2, 3])
        others = [v for v in self.pool if v not in names]
        self.rng.shuffle(others)
        names += others[: k - 1]
        kinds = ["single", "single", "tuple", "list", "dict", "namedtuple", "nested", "int", "none", "input",
                 "return_types"]
        tags = {"namedtuple": "namedtuple_out", "nested": "nested_out", "int": "int_out", "none": "none_out",
                "input": "input_out", "return_types": "return_types_out"}
        kinds = [x for x in kinds if x == "single" or self.ok("container_out", tags.get(x, "container_out"))]
        kind = self.choice(kinds)
        feats = {"container_out", tags.get(kind, "container_out")} if kind != "single" else set()
        fields: tuple[str, ...] = ()
        if kind == "single":
            expr = names[0]
        elif kind == "tuple":
            expr = ", ".join(names) + ("," if len(names) == 1 else "")
        elif kind == "list":
            expr = "[" + ", ".join(names) + "]"
        elif kind == "dict":
            expr = "{" + ", ".join(f"'out{i}': {n}" for i, n in enumerate(names)) + "}"
        elif kind == "namedtuple":
            fields = tuple(f"f{i}" for i in range(len(names)))
            expr = "Out(" + ", ".join(names) + ")"
        elif kind == "nested":
            expr = f"({names[0]}, {{'rest': [" + ", ".join(names[1:]) + "]})"
        elif kind == "int":
            expr = f"{names[0]}, {names[0]}.size(-1)"
        elif kind == "none":
            expr = f"{names[0]}, None"
        elif kind == "input":
            expr = f"{names[0]}, x" if names[0] != "x" else "x, x"
        else:
            expr = f"{names[0]}.max(dim=-1)"
        return expr, frozenset(feats), fields

    # -- the program --------------------------------------------------------------------
    def build(self) -> Program:
        inputs = self.make_inputs()
        training = self.rng.random() < 0.5
        batch = self.choice([2, 3])
        kinds = [
            (self.s_unary, 3.0), (self.s_binary, 3.0), (self.s_inplace, 2.5), (self.s_shape, 2.0),
            (self.s_shape_read, 0.7), (self.s_cat, 0.8), (self.s_linear, 2.0), (self.s_norm, 1.2),
            (self.s_conv, 1.0), (self.s_functional_args, 1.5), (self.s_dropout, 0.8), (self.s_item, 0.2),
            (self.s_mixer, 0.3), (self.s_training_branch, 0.4), (self.s_param_operand, 0.8), (self.s_out_kwarg, 0.2),
            (self.s_recurrent, 0.7), (self.s_embedding, 1.5), (self.s_optional, 1.0), (self.s_buffer_update, 0.3),
            (self.s_grad_mode, 0.2), (self.s_spelling, 1.0),
        ]
        n = self.rng.randint(3, 10)
        untraceable_at = self.rng.randrange(n) if self.rng.random() < self.untraceable_rate else -1
        made = tries = 0
        while made < n and tries < 20 * n:
            tries += 1
            if made == untraceable_at:
                step = self.s_untraceable
            else:
                fns, weights = zip(*kinds)
                step = self.rng.choices(fns, weights)[0]
            saved = (dict(self.attrs), list(self.helpers), {k: list(v) for k, v in self.modules.items()}, self.counter)
            if self.try_add(step()):
                made += 1
                continue
            self.attrs, self.helpers, self.modules, self.counter = saved
            self._reset_envs()
            if step == self.s_untraceable and tries > 5 * n:
                untraceable_at = -1
        self.envs.clear()
        self.holders.clear()
        output, out_features, fields = self.output()
        options: tuple = ()
        used = {f for st in self.body for f in st.features}
        if "helper_branch" in used and self.ok("leaf_fallback") and self.rng.random() < 0.5 \
                and ("attribute_arg" not in used or self.ok("leaf_attribute")):
            options = (("on_untraceable", "leaf"),)
            out_features = out_features | {"leaf_fallback"} | ({"leaf_attribute"} if "attribute_arg" in used else set())
        return Program(
            seed=self.seed, inputs=inputs, attrs=tuple(self.attrs.values()), helpers=tuple(self.helpers),
            body=tuple(self.body), output=output, output_features=out_features, namedtuple_fields=fields,
            training=training, batch=batch, options=options,
        )


def generate(seed: int, exclude: Iterable[str] = (), untraceable_rate: float = 0.3) -> Program:
    """The program for ``seed``. ``exclude``: feature tags it must not use;
    ``untraceable_rate``: the share of programs holding one construct today's tracer refuses."""
    unknown = set(exclude) - FEATURES
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
    with torch.random.fork_rng(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return _Builder(seed, frozenset(exclude), untraceable_rate).build()


def _main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tests.fuzz.generator SEED [SEED ...]", file=sys.stderr)
        return 2
    for arg in argv:
        program = generate(int(arg))
        print(program.source)
        print(f"# features: {', '.join(sorted(program.features))}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
