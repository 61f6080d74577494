"""Expert and data parallelism on CPU: gloo process groups of 2 and 4 forked processes, compared with one process.

Workers assert inside the child; a failure comes back as the child's traceback. Every multi-process test carries the
``multiprocess`` marker and skips (naming the reason) where fork or gloo is unavailable.
"""

import copy
import json
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from smoe import load_pretrained
from smoe.cli import main
from smoe.config import MoEConfig
from smoe.errors import TrainingError
from smoe.io import checkpoint as ckpt
from smoe.models import build_model
from smoe.moe import MoELayer
from smoe.parallel import (
    apply_expert_parallel,
    check_layout,
    collective_errors,
    expert_shard_ranges,
    max_ranks_per_token,
)
from smoe.presets import get as preset
from smoe.train import train_model

TINY = {"dim": 32, "n_layers": 2, "ffn_dim": 64, "vocab_size": 300, "moe.expert_dim": 32, "attention.n_heads": 4,
        "attention.n_kv_heads": 2, "max_seq_len": 64, "moe.n_routed_experts": 8}
FAST = dict(batch_size=8, grad_accum=2, seq_len=32, eval_batches=1, eval_every=0, precision="fp32", lr=3e-3,
            steps=4, save_every=2, keep_last=5)


def _skip_reason() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "the fork start method is not available"
    return None


needs_gloo = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)  # forked children must not share the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    fn(rank, world, *args)


def _run(world: int, fn, *args, limit: float = 120) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` forked processes with torchrun's environment; re-raise a child's
    failure; never wait more than ``limit`` seconds."""
    context = mp.start_processes(_worker, (world, _free_port(), fn, args), nprocs=world, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + limit
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {limit} s")


def _init_gloo(timeout_s: float = 60):
    from datetime import timedelta

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


# --- the all-to-all dispatcher --------------------------------------------------------------------------------------


def _ep_parity(rank, world):
    _init_gloo()
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(n_routed_experts=8, top_k=2, expert_dim=8, n_shared_experts=1))
    x_ND = torch.randn(world * 6, 16)
    w_ND = torch.randn(world * 6, 16)
    x_ref = x_ND.clone().requires_grad_()
    y_ref, stats_ref = layer(x_ref)
    ((y_ref * w_ND).sum() + stats_ref.aux_loss).backward()

    ep_layer = copy.deepcopy(layer)
    ep_layer.zero_grad(set_to_none=True)
    apply_expert_parallel(ep_layer, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    rows = slice(rank * 6, (rank + 1) * 6)
    x = x_ND[rows].clone().requires_grad_()
    y, stats = ep_layer(x)
    # The mean over ranks of the per-rank balance loss is the single-process loss of the whole batch.
    ((y * w_ND[rows]).sum() + stats.aux_loss / world).backward()
    torch.testing.assert_close(y, y_ref[rows])
    torch.testing.assert_close(x.grad, x_ref.grad[rows])
    aux = stats.aux_loss.detach().clone()
    dist.all_reduce(aux)
    torch.testing.assert_close(aux / world, stats_ref.aux_loss.detach())
    router_grad = ep_layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, layer.router.weight.grad)
    experts = slice(ep_layer.experts.expert_start, ep_layer.experts.expert_start + 8 // world)
    for name in ("w_gate_up", "w_down"):
        torch.testing.assert_close(getattr(ep_layer.experts, name).grad, getattr(layer.experts, name).grad[experts])
    dist.destroy_process_group()


@pytest.mark.multiprocess
@needs_gloo
@pytest.mark.parametrize("world", [2, 4])
def test_ep_forward_backward_equals_single_process(world):
    _run(world, _ep_parity)


# --- training: EP and EP x DP against one process, resharding, resume across sizes ---------------------------------


def _text(root: Path) -> Path:
    rng = np.random.default_rng(0)
    words = "once upon a time a little fox found a red ball and played with it in the sun all day".split()
    path = root / "corpus.txt"
    path.write_text("<|endoftext|>".join(" ".join(rng.choice(words, 80)) for _ in range(60)))
    return path


def _train(out, root, **kw):
    return train_model("mixtral-tiny", out=out, data=str(root / "corpus.txt"), overrides=TINY,
                       cache_dir=root / "cache", progress=False, **{**FAST, **kw})


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _train_ep2(rank, world, root):
    _train(root / "ep2", root, ep=2)


def _reshard_to_ep4_then_resume_at_ep2_dp2(rank, world, root):
    _init_gloo()
    source = ckpt.latest_checkpoint(root / "ep2").path
    whole = ckpt.read_tensors(source, "model")
    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    model = apply_expert_parallel(build_model(preset("mixtral-tiny", **TINY)),
                                  init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    shards = expert_shard_ranges(model)
    ckpt.load_model_state(source, model, shards)
    for name, tensor in model.state_dict().items():
        start, stop, _ = shards.get(name, (0, len(whole[name]), None))
        assert torch.equal(tensor, whole[name][start:stop]), name
    _train(root / "resumed", root, ep=2, dp=2, resume=True)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if _skip_reason() is not None:
        pytest.skip(_skip_reason())
    root = tmp_path_factory.mktemp("parallel")
    _text(root)
    _train(root / "single", root)
    _run(2, _train_ep2, root)
    shutil.copytree(root / "ep2", root / "resumed")
    shutil.rmtree(ckpt.latest_checkpoint(root / "resumed").path)  # resume from step 2
    _run(4, _reshard_to_ep4_then_resume_at_ep2_dp2, root)
    return root


@pytest.mark.multiprocess
def test_ep2_training_losses_match_single_process(runs):
    np.testing.assert_allclose(_losses(runs / "ep2"), _losses(runs / "single"), rtol=1e-5)


@pytest.mark.multiprocess
def test_resume_at_ep2_x_dp2_from_an_ep2_checkpoint_matches_single_process(runs):
    np.testing.assert_allclose(_losses(runs / "resumed"), _losses(runs / "single"), rtol=1e-5)
    a = ckpt.read_tensors(ckpt.latest_checkpoint(runs / "single").path, "model")
    b = ckpt.read_tensors(ckpt.latest_checkpoint(runs / "resumed").path, "model")
    assert a.keys() == b.keys()
    for k in a:  # AdamW divides by sqrt(v) + eps, so reduction-order noise in tiny gradients shows: far below lr
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=3e-5)


@pytest.mark.multiprocess
def test_ep2_checkpoint_loads_into_one_process_and_consolidates(runs, tmp_path):
    sharded = ckpt.latest_checkpoint(runs / "ep2").path
    assert sorted(p.name for p in sharded.glob("*-ep*.safetensors")) == [
        "model-ep0-of-2.safetensors", "model-ep1-of-2.safetensors",
        "optimizer-ep0-of-2.safetensors", "optimizer-ep1-of-2.safetensors"]
    single = ckpt.consolidate(sharded, tmp_path / "single")
    assert main(["convert", str(runs / "ep2"), "--out", str(tmp_path / "converted")]) == 0
    assert ckpt.read_tensors(tmp_path / "converted", "optimizer").keys() == \
        ckpt.read_tensors(single, "optimizer").keys()
    assert {"model.safetensors", "optimizer.safetensors", "state.json", "config.json"} <= {
        p.name for p in single.iterdir()}
    a, b = build_model(preset("mixtral-tiny", **TINY)), build_model(preset("mixtral-tiny", **TINY))
    ckpt.load_model_state(sharded, a)
    ckpt.load_model_state(single, b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    loaded = load_pretrained(runs / "ep2")  # the Python API reads the per-rank layout too
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in a.state_dict().items())
    for kind in ("model", "optimizer"):
        whole, flat = ckpt.read_tensors(sharded, kind), ckpt.read_tensors(single, kind)
        assert whole.keys() == flat.keys() and all(torch.equal(whole[k], flat[k]) for k in whole)


# --- failures -----------------------------------------------------------------------------------------------------


def _one_rank_hangs(rank, world, root, timeout_s):
    _init_gloo(timeout_s)
    layer = apply_expert_parallel(MoELayer(16, MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8)),
                                  init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    if rank == 1:  # hangs: never joins the all-to-all, until rank 0 has given up
        deadline = time.monotonic() + 60
        while not (root / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"rank 0: a collective .* did not finish within `dist_timeout` 3 s"):
        with collective_errors(timeout_s):
            layer(torch.randn(5, 16))
    (root / "done").write_text(f"{time.monotonic() - start:.1f}")
    os._exit(0)  # the group is broken: skip its teardown


@pytest.mark.multiprocess
@needs_gloo
def test_a_hung_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    _run(2, _one_rank_hangs, tmp_path, 3.0, limit=60)
    assert float((tmp_path / "done").read_text()) < 3.0 + 5


@pytest.mark.parametrize("ep, dp, world, batch, match", [
    (2, None, 1, 8, r"ep 2 x `dp` 1: needs 2 processes, got 1; launch with torchrun --nproc-per-node 2"),
    (2, 3, 4, 8, r"ep 2 x `dp` 3: needs 6 processes, got 4"),
    (3, None, 3, 6, r"ep 3: must divide moe.n_routed_experts \(8\)"),
    (2, None, 4, 6, r"batch_size 6: must be divisible by `grad_accum` x processes \(1 x 4 = 4\)"),
    (0, None, 1, 8, r"--ep: must be a positive integer, got 0"),
])
def test_bad_layouts_are_refused_before_work(ep, dp, world, batch, match):
    with pytest.raises(ValueError, match=match):
        check_layout(preset("mixtral-tiny", **TINY), ep, dp, world, batch, grad_accum=1)


def test_train_with_ep_but_one_process_says_how_to_launch(tmp_path):
    with pytest.raises(ValueError, match="launch with torchrun"):
        train_model("mixtral-tiny", out=tmp_path / "run", data="/no/such/data", overrides=TINY, ep=2, steps=1,
                    seq_len=32)
    assert not (tmp_path / "run").exists()


# --- device-level balance and device-limited routing ---------------------------------------------------------------


def test_device_limited_routing_bounds_the_ranks_a_token_reaches():
    v3 = preset("deepseek-v3").moe  # 256 experts, top-8, 8 groups (nodes), 4 of them per token
    assert max_ranks_per_token(v3, 64) == 8  # each group spans 8 ranks, but a token has only 8 experts
    limited = MoEConfig(n_routed_experts=16, top_k=6, n_group=8, topk_group=2)
    assert max_ranks_per_token(limited, 8) == 2  # one group per rank: M = topk_group ranks
    assert max_ranks_per_token(limited, 4) == 2  # two groups per rank
    assert max_ranks_per_token(MoEConfig(n_routed_experts=16, top_k=6), 8) == 6


def test_device_balance_loss_needs_groups():
    with pytest.raises(ValueError, match=r"moe\.device_balance_loss_coef: needs n_group >= 2"):
        MoEConfig(device_balance_loss_coef=0.05).validate()
