"""wrap_tensor_ops: every table entry, bit-exact on inputs other than the example."""

import operator

import pytest
import torch

import qprep
from qprep.capture import trace
from qprep.passes.op_tables import FUNCTION_TABLE, METHOD_TABLE
from qprep.passes.wrap_tensor_ops import wrap_tensor_ops
from tests.models import CallModel
from tests.op_cases import FUNCTION_CASES, METHOD_CASES


def _inputs(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(*s, generator=g) + 0.5 for s in shapes)


def _remaining_table_ops(gm):
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in FUNCTION_TABLE:
            out.append(n)
        if n.op == "call_method" and n.target in METHOD_TABLE:
            out.append(n)
    return out


def test_every_table_entry_has_a_case():
    assert set(FUNCTION_TABLE) <= set(FUNCTION_CASES)
    assert set(METHOD_TABLE) <= set(METHOD_CASES)


def _check(call, shapes):
    model = CallModel(call, len(shapes))
    gm = qprep.prepare(model, _inputs(shapes, 1))
    gm.graph.lint()
    assert not _remaining_table_ops(gm), gm.code
    assert any(isinstance(m, qprep.modules.TensorOp) for m in gm.modules())
    fresh = _inputs(shapes, 2)
    expected = model(*[t.clone() for t in fresh])
    assert qprep.verify(model, gm, fresh).equal
    got = gm(*[t.clone() for t in fresh])
    for a, b in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", list(FUNCTION_CASES), ids=lambda f: getattr(f, "__name__", str(f)))
def test_function_entry_bit_exact(fn):
    _check(*FUNCTION_CASES[fn])


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_method_entry_bit_exact(name):
    _check(*METHOD_CASES[name])


def test_constants_become_attributes_shown_in_repr():
    gm = qprep.prepare(CallModel(lambda x: torch.cat([x, 1 - x], dim=1)), (torch.rand(2, 3),))
    cat = gm.get_submodule("cat")
    sub = gm.get_submodule("sub")
    assert isinstance(cat, qprep.modules.Cat) and "dim=1" in repr(cat)
    assert isinstance(sub, qprep.modules.Sub) and "input=1" in repr(sub)


def test_shape_arithmetic_stays_plain_python():
    def f(x):
        n = x.size(0) // 2
        return x[:n] * 2

    gm = qprep.prepare(CallModel(f), (torch.rand(4, 3),))
    floordivs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.floordiv]
    assert len(floordivs) == 1
    assert isinstance(gm.get_submodule("mul"), qprep.modules.Mul)
    x = torch.rand(6, 3)
    assert torch.equal(gm(x), f(x))


def test_shape_arithmetic_without_example_inputs():
    def f(x):
        return x.view(x.size(0) // 2, -1) + 1

    gm = qprep.prepare(CallModel(f))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.floordiv]
    x = torch.rand(4, 3)
    assert torch.equal(gm(x), f(x))


def test_inplace_stays_inplace_and_out_of_place_stays_out_of_place():
    def f(x, y):
        z = x + y
        x.add_(y)
        return z, x

    gm = qprep.prepare(CallModel(f, 2), (torch.rand(3), torch.rand(3)))
    mods = [m for m in gm.modules() if isinstance(m, qprep.modules.Add)]
    assert sorted(m.inplace for m in mods) == [False, True]
    x, y = torch.rand(3), torch.rand(3)
    x2 = x.clone()
    z, out = gm(x2, y)
    assert out is x2 and torch.equal(x2, x + y) and torch.equal(z, x + y)


@torch.fx.wrap
def clone(x):
    """A user function that happens to share a data-movement method's name (it branches on
    tensor data, so it is not traced into but kept as one call)."""
    return x * 3 if bool(x.sum() > -1e9) else x


class StandAlone(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.relu(x) + x.sigmoid() + clone(x)


def test_pass_alone_records_everything_it_leaves():
    gm, _ = trace(StandAlone())
    result = wrap_tensor_ops(gm, qprep.PrepareConfig())
    skipped = {c.op: c.reason for c in result.skipped}
    assert skipped["torch.nn.functional.relu"].startswith("a torch.nn.functional call")
    assert skipped["Tensor.sigmoid"].startswith("a torch.nn.functional call")
    assert [c.op for c in result.rewritten] == ["operator.add", f"{__name__}.clone", "operator.add"]


def test_ops_are_matched_by_identity_not_by_name():
    gm, _ = trace(StandAlone())
    result = wrap_tensor_ops(gm, qprep.PrepareConfig())
    clone_change = {c.op: c for c in result.changes}[f"{__name__}.clone"]  # not Tensor.clone's data movement
    assert clone_change.module_type == "qprep.modules.Functional" and "no dedicated wrapper" in clone_change.reason
    with pytest.raises(qprep.RewriteError, match="clone"):
        qprep.prepare(StandAlone(), (torch.randn(3),), strict=True)


class TopK(torch.nn.Module):
    """A user's module for torch.topk, called with the call's own arguments."""

    def forward(self, x, k, dim=-1):
        return torch.topk(x, k, dim=dim)


def test_user_op_modules_extend_the_tables():
    model = CallModel(lambda x: torch.topk(torch.nn.functional.gelu(x), 2, dim=-1).values.cumsum(-1))
    x = torch.randn(3, 5)
    Cumsum = type("Cumsum", (qprep.modules.TensorOp,), {})
    Gelu = type("Gelu", (qprep.modules.TensorOp,), {})
    gm = qprep.prepare(model, (x,), op_modules={torch.topk: TopK, torch.nn.functional.gelu: Gelu, "cumsum": Cumsum})
    modules = {name: type(m) for name, m in gm.named_modules() if name}
    assert modules == {"topk": TopK, "gelu": Gelu, "cumsum": Cumsum}  # F.gelu: the user's module, not nn.GELU
    assert "self.topk(gelu, 2, dim = -1)" in gm.code  # the call's own arguments
    assert repr(gm.cumsum) == "Cumsum(arg1=-1, call=Tensor.cumsum)"
    assert qprep.verify(model, gm, torch.randn(4, 5)).equal


def test_op_modules_must_map_to_module_classes():
    with pytest.raises(qprep.InputError, match="must be an nn.Module class"):
        qprep.PrepareConfig(op_modules={torch.topk: torch.topk})
