"""Every expert backend matches the reference loop, forward and backward."""

import os

import pytest
import torch

from smoe import kernels

E, D, F = 6, 16, 12
CPU = torch.device("cpu")
FAST = [n for n in kernels.names() if n not in ("auto", "reference") and kernels.available(n, CPU)]
# The Triton interpreter's bf16 tl.dot returns garbage (numpy has no bf16): Triton bf16 is checked on a GPU only.
FAST_BF16 = [n for n in FAST if not (n == "triton" and os.environ.get("TRITON_INTERPRET") == "1")]


def _case(counts, dtype=torch.float32, seed=0, F=F):
    g = torch.Generator().manual_seed(seed)
    counts_E = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(int(counts_E.sum()), D, generator=g, dtype=dtype).requires_grad_()
    w_gate_up = (torch.randn(E, 2 * F, D, generator=g) * 0.2).to(dtype).requires_grad_()
    w_down = (torch.randn(E, D, F, generator=g) * 0.2).to(dtype).requires_grad_()
    return x, counts_E, w_gate_up, w_down


def _run(backend, x, counts_E, w_gate_up, w_down, activation):
    grads_in = [t.detach().clone().requires_grad_() for t in (x, w_gate_up, w_down)]
    y = kernels.get(backend, torch.device("cpu"))(grads_in[0], counts_E, grads_in[1], grads_in[2], activation)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)).sum().backward()
    return y.detach(), [t.grad for t in grads_in]


COUNTS = {
    "uneven": [3, 0, 7, 1, 0, 5],
    "all_on_one": [0, 0, 16, 0, 0, 0],
    "empty": [0, 0, 0, 0, 0, 0],
    "one_each": [1, 1, 1, 1, 1, 1],
}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_backend_matches_reference_fp32(backend, counts, activation):
    case = _case(counts)
    y_ref, g_ref = _run("reference", *case, activation)
    y, g = _run(backend, *case, activation)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_idle_experts_get_exactly_zero_weight_gradients_on_recycled_memory(backend):
    case = _case(COUNTS["uneven"])
    for _ in range(4):  # leave NaN-filled blocks of the gradients' sizes for the allocator to hand out again
        junk = [torch.full_like(w, float("nan")) for w in case[2:]]
        del junk
    _, (_, dw_gu, dw_down) = _run(backend, *case, "silu")
    for e in (1, 4):  # the experts with no rows
        assert not dw_gu[e].any() and not dw_down[e].any()


@pytest.mark.parametrize("backend", FAST_BF16)
def test_backend_matches_reference_bf16(backend):
    case = _case(COUNTS["uneven"], dtype=torch.bfloat16, F=16)  # bf16 rows of 16 elements: 32-byte aligned
    y_ref, g_ref = _run("reference", *case, "silu")
    y, g = _run(backend, *case, "silu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_auto_resolves_to_a_registered_backend():
    assert kernels.resolve("auto", torch.device("cpu")) in kernels.names()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_on_cpu_loops_over_experts_but_decodes_with_grouped_mm(dtype):
    assert kernels.resolve("auto", CPU, dtype, n_rows=4096, n_experts=64) == "expert_loop"
    assert kernels.resolve("auto", CPU, dtype, n_rows=8, n_experts=64) == "grouped_mm"


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="unknown expert backend 'triton_v9'; known: auto, "):
        kernels.resolve("triton_v9", torch.device("cpu"))


@pytest.mark.parametrize("backend", FAST)
def test_backend_handles_unaligned_expert_dim(backend):
    case = _case(COUNTS["uneven"], F=5)  # 20-byte rows: too narrow for torch._grouped_mm's alignment
    y_ref, _ = _run("reference", *case, "silu")
    y, _ = _run(backend, *case, "silu")
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("backend", FAST)
def test_backend_under_bf16_autocast_with_fp32_weights(backend):
    """Training's setting: fp32 master weights, bf16 autocast; the layer casts the rows, the backend must cope."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly (a 16x16 dot is off by 1e10); the gpu test "
                    "covers bf16")
    from smoe.config import MoEConfig
    from smoe.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(32, MoEConfig(n_routed_experts=4, top_k=2, expert_dim=16))
    x = torch.randn(2, 24, 32)

    def run(name):
        layer.backend = name
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, stats = layer(x)
        (y.float().square().mean() + stats.aux_loss).backward()
        return y.detach().float(), [p.grad.clone() for p in layer.parameters()]

    y_ref, g_ref = run("reference")
    y, g = run(backend)
    torch.testing.assert_close(y, y_ref, rtol=3e-2, atol=3e-2)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)
