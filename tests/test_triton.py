"""Triton kernels against the reference on tiny shapes, on CPU through the Triton interpreter (seconds), and on a
real GPU when there is one (marked gpu)."""

import os

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py selects the interpreter when there is no GPU

from smoe import kernels  # noqa: E402
from smoe.config import MoEConfig  # noqa: E402
from smoe.kernels.triton import select_experts  # noqa: E402
from smoe.moe import MoELayer  # noqa: E402
from smoe.moe.experts import Experts  # noqa: E402
from smoe.moe.router import _limit_to_groups  # noqa: E402

CPU = torch.device("cpu")
E, D = 4, 24  # D not a multiple of the tile: masks are exercised


def _case(counts, F, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts_E = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(int(counts_E.sum()), D, generator=g).to(dtype)
    w_gu = (torch.randn(E, 2 * F, D, generator=g) * 0.3).to(dtype)
    w_down = (torch.randn(E, D, F, generator=g) * 0.3).to(dtype)
    return [t.to(device) for t in (x, counts_E, w_gu, w_down)]


def _run(backend, x, counts_E, w_gu, w_down, activation):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gu, w_down)]
    y = kernels.get(backend, x.device, x.dtype)(leaves[0], counts_E, leaves[1], leaves[2], activation)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return [y.detach().float()] + [t.grad.float() for t in leaves]


COUNTS = {"uneven": [5, 0, 70, 2], "empty": [0, 0, 0, 0], "all_on_one": [0, 9, 0, 0]}


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_triton_backend_matches_reference_fp32(counts, activation):
    case = _case(counts, F=20, dtype=torch.float32, device=CPU)  # 70 rows span two 64-row blocks of one expert
    for got, want in zip(_run("triton", *case, activation), _run("reference", *case, activation), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _layer_pair(cfg, device, dtype):
    torch.manual_seed(0)
    fused = MoELayer(D, cfg, init_std=0.3, backend="triton").to(device, dtype)
    ref = MoELayer(D, cfg, init_std=0.3, backend="reference").to(device, dtype)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _layer_grads(layer, x):
    x = x.detach().clone().requires_grad_()
    y, stats = layer(x)
    (y.float().square().mean() + stats.aux_loss).backward()
    return [y.detach().float(), x.grad.float()] + [p.grad.float() for p in layer.parameters()]


LAYERS = {
    "qwen": MoEConfig(n_routed_experts=E, top_k=2, expert_dim=20),
    "capacity": MoEConfig(n_routed_experts=E, top_k=2, expert_dim=20, capacity_factor=0.5),
    "deepseek_v3": MoEConfig(n_routed_experts=8, top_k=2, expert_dim=20, score_func="sigmoid", n_group=4,
                             topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1),
}


@pytest.mark.parametrize("cfg", LAYERS.values(), ids=LAYERS.keys())
def test_fused_layer_matches_reference_layer(cfg):
    fused, ref = _layer_pair(cfg, CPU, torch.float32)
    x = torch.randn(2, 9, D)
    for got, want in zip(_layer_grads(fused, x), _layer_grads(ref, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_replaced_experts_module_gets_the_plain_seam():
    """Expert parallelism swaps layer.experts for an ``Experts`` implementing only the seam, (x_RD, counts_E,
    backend): the layer must not take the fused path then."""
    fused, ref = _layer_pair(LAYERS["qwen"], CPU, torch.float32)
    calls = []

    class Wrapped(Experts):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x_RD, counts_E, backend):
            calls.append(counts_E.sum().item())
            return self.inner(x_RD, counts_E, backend)

    fused.experts = Wrapped(fused.experts)
    x = torch.randn(9, D)
    torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-4, atol=1e-4)
    assert calls == [18]


@pytest.mark.parametrize("n_group,topk_group,group_score", [(1, 1, "max"), (4, 2, "max"), (4, 2, "top2_sum")])
def test_select_experts_matches_torch_topk(n_group, topk_group, group_score):
    choice = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    cfg = MoEConfig(n_routed_experts=16, top_k=3, n_group=n_group, topk_group=topk_group, group_score=group_score,
                    score_func="sigmoid")
    want = (_limit_to_groups(choice, cfg) if n_group > 1 else choice).topk(3, dim=-1).indices
    got = select_experts(choice, 3, n_group, topk_group, group_score == "top2_sum")
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and triton compiled for it (run with TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_triton_on_gpu_matches_reference(dtype, tol):
    cuda = torch.device("cuda")
    case = _case([300, 0, 7, 1000], F=96, dtype=dtype, device=cuda)
    for got, want in zip(_run("triton", *case, "silu"), _run("reference", *case, "silu"), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    fused, ref = _layer_pair(LAYERS["deepseek_v3"], cuda, dtype)
    x = torch.randn(3, 50, D, device=cuda, dtype=dtype)
    for got, want in zip(_layer_grads(fused, x), _layer_grads(ref, x), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
