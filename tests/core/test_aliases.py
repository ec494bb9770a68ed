"""qprep.core.aliases: second names of shared tensors hidden from state_dict, and state the
traced graph lost restored as the same objects."""

import copy
import io
import pickle

import torch
import torch.nn as nn

from qprep.core.aliases import hide_aliases, restore_missing_state


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.twin = nn.Linear(3, 2)
        self.twin.weight = self.lin.weight  # an alias qprep would make
        self.twin.bias = self.lin.bias


def test_hidden_alias_keys_leave_state_dict_and_load_without_them():
    m = Holder()
    assert "twin.weight" in m.state_dict()
    hide_aliases(m, {"twin.weight": "lin.weight", "twin.bias": "lin.bias"})
    assert list(m.state_dict()) == ["lin.weight", "lin.bias"]
    state = {k: torch.full_like(v, 7.0) for k, v in m.state_dict().items()}
    m.load_state_dict(state, strict=True)  # the alias keys are not required ...
    assert torch.equal(m.twin.weight, torch.full((2, 3), 7.0))  # ... and the shared object got the value
    assert m.twin.weight is m.lin.weight


def test_hidden_aliases_travel_with_deepcopy_pickle_and_torch_save():
    m = Holder()
    hide_aliases(m, {"twin.weight": "lin.weight", "twin.bias": "lin.bias"})
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buffer, weights_only=False)):
        assert list(clone.state_dict()) == ["lin.weight", "lin.bias"]
        assert clone.twin.weight is clone.lin.weight


def test_private_state_is_hidden_and_kept_when_a_checkpoint_lacks_it():
    m = nn.BatchNorm1d(2)
    hide_aliases(m, {"num_batches_tracked": None})
    m.num_batches_tracked.fill_(5)
    assert "num_batches_tracked" not in m.state_dict()
    m.load_state_dict({k: v for k, v in m.state_dict().items()}, strict=True)
    assert int(m.num_batches_tracked) == 5


def test_a_tie_the_user_made_is_not_an_alias():
    m = Holder()  # twin.weight is tied by the "user" here: nothing hidden
    assert {"lin.weight", "twin.weight"} <= set(m.state_dict())


def test_restore_missing_state_attaches_the_same_objects():
    original = nn.Module()
    original.used = nn.Linear(2, 2)
    original.unused = nn.Linear(2, 2)  # never called: a trace would drop it
    original.register_buffer("stat", torch.ones(2))
    original.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    prepared = nn.Module()
    prepared.used = original.used
    attached = restore_missing_state(original, prepared)
    assert sorted(attached) == ["extra", "stat", "unused"]
    assert prepared.unused is original.unused and prepared.stat is original.stat and prepared.extra is original.extra
    assert list(prepared.state_dict()) == list(original.state_dict()) or set(prepared.state_dict()) == set(original.state_dict())
    assert restore_missing_state(original, prepared) == []  # nothing left to attach
