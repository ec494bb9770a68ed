"""The pipeline runner: order, lint, names the failing pass, idempotent, callbacks."""

import pytest
import torch

import qprep
from qprep.capture import trace
from qprep.core.records import PassResult
from qprep.examples import DistillerBlock
from qprep.passes import PIPELINE, pass_name, run_pipeline


def test_pipeline_is_the_documented_order_and_results_carry_pass_names():
    assert [pass_name(p) for p in PIPELINE] == ["expand_rnns", "convert_functionals", "wrap_tensor_ops",
                                               "split_reused_modules"]
    gm, _ = trace(DistillerBlock())
    results = run_pipeline(gm, qprep.PrepareConfig())
    assert [r.pass_name for r in results] == [pass_name(p) for p in PIPELINE]
    assert all(isinstance(r, PassResult) and r.graph_module is gm for r in results)


def test_running_it_twice_changes_nothing():
    gm, _ = trace(DistillerBlock())
    run_pipeline(gm, qprep.PrepareConfig())
    code = gm.code
    assert not any(r.changed for r in run_pipeline(gm, qprep.PrepareConfig()))
    assert gm.code == code


def test_a_failing_pass_is_named_with_the_passes_before_it():
    def broken(gm, config):
        raise KeyError("x")

    gm, _ = trace(DistillerBlock())
    with pytest.raises(qprep.PassError, match=r"pass broken failed after \[expand_rnns\]: KeyError") as info:
        run_pipeline(gm, qprep.PrepareConfig(), passes=(PIPELINE[0], broken))
    assert info.value.pass_name == "broken" and info.value.completed == ("expand_rnns",)


def test_a_pass_that_breaks_the_graph_fails_the_lint_and_is_named():
    def dangling(gm, config):
        first = next(n for n in gm.graph.nodes if n.op == "call_module")
        later = list(gm.graph.nodes)[-2]
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.relu, (later,))  # uses a value before it is computed
        return PassResult("dangling", gm, True)

    gm, _ = trace(DistillerBlock())
    with pytest.raises(qprep.PassError, match="pass dangling failed after"):
        run_pipeline(gm, qprep.PrepareConfig(), passes=(dangling,))


def test_after_each_sees_every_pass_on_a_recompiled_module():
    seen = []
    gm, _ = trace(DistillerBlock())
    def check(name, current):
        seen.append((name, "self.add(" in current.code or name in ("expand_rnns", "convert_functionals")))

    run_pipeline(gm, qprep.PrepareConfig(), after_each=check)
    assert [name for name, _ in seen] == [pass_name(p) for p in PIPELINE]
    assert all(ok for _, ok in seen)
