"""Every router a suite trains learns from the LM loss: top-1 renormalised gates (weight exactly 1) are refused."""

import pytest
import torch

from smoe.config import override
from smoe.eval.suite import Arch, Contrast, Suite, check_design
from smoe.eval.suites import SUITES
from smoe.models import build_model

SMALL = {"dim": 32, "n_layers": 2, "vocab_size": 300, "attention.n_heads": 2, "attention.n_kv_heads": 2,
         "moe.expert_dim": 32}
TOP1 = [pytest.param(arch, id=f"{name}/{arch.label}") for name, suite in SUITES.items() for arch in suite.archs
        if arch.config().moe is not None and arch.config().moe.top_k == 1 and arch.config().moe.routing != "hash"]


@pytest.mark.parametrize("arch", TOP1)
def test_top1_suite_router_gets_a_gradient_from_the_lm_loss(arch):
    torch.manual_seed(0)
    model = build_model(override(arch.config(), SMALL))  # routing fields as the suite's, sizes shrunk
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], ids[:, 1:]).lm_loss.backward()  # the LM loss alone, no balance terms
    for layer in model.moe_layers:
        router, experts = layer.router.weight.grad.norm(), layer.experts.w_down.grad.norm()
        assert router > 1e-2 * experts, f"router grad {router:.2e} vs expert grad {experts:.2e}"


def test_suites_have_top1_architectures_to_check():
    assert any(p.id == "granularity/E8-k1" for p in TOP1)


def test_a_router_the_lm_loss_cannot_reach_is_refused_before_training():
    archs = [Arch("switch", "switch"), Arch("top1-renorm", "switch", {"moe.norm_topk_prob": True})]
    with pytest.raises(ValueError, match=r"'top1-renorm': moe.top_k=1 with moe.norm_topk_prob=true .* never "
                                         r"reaches the router"):
        check_design(Suite(archs, contrasts=(Contrast("top1-renorm", "switch", "active", "t"),)), seq_len=64)
