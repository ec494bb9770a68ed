"""wrap_tensor_ops: every table entry, bit-exact on inputs other than the example."""

import operator

import pytest
import torch

import qprep
from qprep.passes.wrap_tensor_ops import FUNCTION_TABLE, METHOD_TABLE
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
