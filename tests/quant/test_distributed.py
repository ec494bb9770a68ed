"""Prepared models under torch.distributed on CPU (gloo, 2 processes): DDP training matches the
original bit for bit, quantization-aware training runs, FSDP2 shards prepared layers.

Slow: each test starts two processes."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import qprep
import qprep.quant as qq
from tests.quant.tasks import SmallCNN, bars, sequences
from qprep.examples import TinyLSTMLM

pytestmark = pytest.mark.slow
WORLD = 2
STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path: Path, *args) -> dict:
    out = tmp_path / "result.pt"
    mp.spawn(worker, args=(WORLD, _free_port(), str(out), *args), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _cnn_batch(rank: int, step: int):
    x, y = bars(16, torch.Generator().manual_seed(1000 * rank + step))
    return x, y, F.cross_entropy


def _lm_batch(rank: int, step: int):
    seq = sequences(16, torch.Generator().manual_seed(1000 * rank + step))
    return seq[:-1], seq[1:], lambda logits, target: F.cross_entropy(logits.reshape(-1, 16), target.reshape(-1))


def _train_ddp(model: nn.Module, batch, rank: int, steps: int) -> tuple[dict, list[float]]:
    ddp = nn.parallel.DistributedDataParallel(model.train())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y, loss_fn = batch(rank, step)
        loss = loss_fn(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def _ddp_worker(rank, world, port, out, steps):
    _init(rank, world, port)
    done = False
    try:
        results = {}
        # nn.LSTM's default oneDNN kernel is not bitwise reproducible by a modular LSTM;
        # ATen's native one is (forward and backward), so the LSTM models train on it.
        for name, build, batch, onednn in (
                ("SmallCNN", SmallCNN, _cnn_batch, True),
                ("TinyLSTMLM", lambda: TinyLSTMLM(16, 32, 2, dropout=0.2), _lm_batch, False)):
            with torch.backends.mkldnn.flags(enabled=onednn):
                torch.manual_seed(0)
                original = build()
                prepared = qprep.prepare(copy.deepcopy(original).eval(), (batch(0, 0)[0][:2],))
                torch.manual_seed(1 + rank)  # dropout draws the same masks in both runs
                state_o, losses_o = _train_ddp(original, batch, rank, steps)
                torch.manual_seed(1 + rank)
                state_p, losses_p = _train_ddp(prepared, batch, rank, steps)
            results[name] = {
                "keys": sorted(state_o) == sorted(state_p),
                "equal": all(torch.equal(state_o[k], state_p[k]) for k in state_o),
                "losses": (losses_o, losses_p),
            }
        torch.manual_seed(0)
        model = SmallCNN()
        x = _cnn_batch(0, 0)[0][:2]
        qat = qq.attach_fake_quant(qprep.prepare(model.eval(), (x,)).train(), (x,),
                                   qconfig=qq.int8_qconfig(observer="moving_average"))
        _, losses = _train_ddp(qat, _cnn_batch, rank, 3 * steps)
        results["qat"] = {"losses": losses, "fake_quant_modules": len(qq.fake_quant_modules(qat))}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
        done = True
    finally:
        dist.destroy_process_group()
        if done:  # the results are saved: skip interpreter teardown, where gloo's threads aborted
            os._exit(0)  # rank 1 once in CI ("terminate called without an active exception")


def test_ddp_trains_prepared_models_bitwise_like_the_originals_and_qat_runs(tmp_path):
    results = _spawn(_ddp_worker, tmp_path, STEPS)
    for name in ("SmallCNN", "TinyLSTMLM"):
        assert results[name]["keys"], name
        assert results[name]["equal"], f"{name}: parameters and buffers differ after {STEPS} DDP steps"
        losses_o, losses_p = results[name]["losses"]
        assert losses_o == losses_p and losses_o[-1] < losses_o[0]
    qat = results["qat"]["losses"]
    assert all(torch.isfinite(torch.tensor(qat)))
    assert sum(qat[-5:]) / 5 < sum(qat[:5]) / 5  # the loss falls with fake quantization on
    assert results["qat"]["fake_quant_modules"] > 20


# ----------------------------------------------------------------------------- FSDP2
class _Stack(nn.Module):
    """A small pre-norm transformer: the decoder layers FSDP2 shards one by one."""

    def __init__(self, layers: int = 2, dim: int = 16):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)])
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def _fsdp_batch(rank: int, step: int):
    """One fixed batch per rank (the loss of fitting it must fall)."""
    gen = torch.Generator().manual_seed(1000 * rank)
    return torch.randn(4, 6, 16, generator=gen), torch.randint(0, 4, (4,), generator=gen)


def _fsdp_worker(rank, world, port, out, steps, modes):
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, port)
    failed = False
    try:
        results = {}
        x = _fsdp_batch(0, 0)[0]
        for mode in modes:
            torch.manual_seed(0)
            model = _Stack()
            if mode == "per_layer":  # each layer prepared on its own: a GraphModule whose forward runs
                for i, layer in enumerate(model.layers):
                    model.layers[i] = qprep.prepare(layer, (x,))
            elif mode.startswith("whole"):  # one GraphModule: the layers' own forward never runs
                model = qprep.prepare(model, (x,))
            layers = [m for _, m in model.layers.named_children()] if mode != "whole_root_only" else []
            try:
                for layer in layers:
                    fully_shard(layer)
                fully_shard(model)
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                losses = []
                for step in range(steps):
                    xb, yb = _fsdp_batch(rank, step)
                    loss = F.cross_entropy(model(xb), yb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                full = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
                results[mode] = {"losses": losses, "state": full,
                                 "sharded": type(next(model.parameters())).__name__}
            except Exception as exc:  # noqa: BLE001  (reported to the test)
                failed = True
                results[mode] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            dist.barrier()
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        if failed:  # FSDP2 state left by a failed forward can abort the process at teardown
            os._exit(0)
        dist.destroy_process_group()


def test_fsdp2_fully_shard_prepared_layers_on_cpu(tmp_path):
    results = _spawn(_fsdp_worker, tmp_path, 6, ("original", "per_layer", "whole_root_only"))
    original, per_layer = results["original"], results["per_layer"]
    assert "error" not in original and "error" not in per_layer, (original.get("error"), per_layer.get("error"))
    assert per_layer["sharded"] == "DTensor"
    assert per_layer["losses"][-1] < per_layer["losses"][0]
    # the same training: attention's fused SDPA kernel vs the modular math path, within float error
    for key, value in original["state"].items():
        assert torch.allclose(value, per_layer["state"][key], atol=1e-5), key
    # sharded as one unit (the root's hooks do run), it trains: no per-layer memory saving though
    root_only = results["whole_root_only"]
    assert "error" not in root_only, root_only.get("error")
    for key, value in original["state"].items():
        assert torch.allclose(value, root_only["state"][key], atol=1e-5), key


def test_fsdp2_per_layer_sharding_needs_the_layers_own_forward(tmp_path):
    # a whole-model GraphModule calls the layers' leaves directly: FSDP2's per-layer hooks never run
    results = _spawn(_fsdp_worker, tmp_path, 1, ("whole",))
    assert "mixed torch.Tensor and DTensor" in results["whole"]["error"]


def _fsdp_llama_worker(rank, world, port, out, steps):
    from torch.distributed.fsdp import fully_shard

    import qprep.hf
    from tests.hf_models import build

    _init(rank, world, port)
    done = False
    try:
        results = {}
        for mode in ("original", "per_layer"):
            model = build("llama").train()
            model.config.use_cache = False
            if mode == "per_layer":  # each decoder layer prepared on the calls one forward makes
                ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
                for i, layer in enumerate(model.model.layers):
                    calls = qprep.hf.record_calls(model, layer, lambda: model(ids, use_cache=False))
                    model.model.layers[i] = qprep.prepare(layer, calls[0])
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            losses = []
            tokens = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(100 + rank))
            for _ in range(steps):
                loss = model(tokens, labels=tokens, use_cache=False).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            results[mode] = {"losses": losses, "sharded": type(next(model.parameters())).__name__,
                             "state": {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()},
                             "prepared": [isinstance(m, torch.fx.GraphModule) for m in model.model.layers]}
            dist.barrier()
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
        done = True
    finally:
        dist.destroy_process_group()
        if done:  # the results are saved: skip interpreter teardown, where FSDP2's threads
            os._exit(0)  # aborted a worker once in CI ("terminate called without an active exception")


def test_fsdp2_shards_the_prepared_decoder_layers_of_a_llama(tmp_path):
    pytest.importorskip("transformers")
    results = _spawn(_fsdp_llama_worker, tmp_path, 5)
    original, per_layer = results["original"], results["per_layer"]
    assert per_layer["sharded"] == "DTensor" and per_layer["prepared"] == [True, True]
    assert original["prepared"] == [False, False]
    assert per_layer["losses"][-1] < per_layer["losses"][0]
    # SDPA's default CPU kernel vs the modular math kernel: equal to float rounding
    assert torch.allclose(torch.tensor(original["losses"]), torch.tensor(per_layer["losses"]), atol=1e-5)
    assert set(original["state"]) == set(per_layer["state"])
    for key, value in original["state"].items():
        assert torch.allclose(value, per_layer["state"][key], atol=1e-5), key
