"""The built-in head-to-head suites, each with its pre-registered contrasts, on the ablation family
(smoe/presets/ablation.py: d 128, every FFN activating 512 hidden units per token), and ``resolve_suite``.

Every suite but the two-phase and hybrid ones carries the same dense compute ladder (FFN 128 to 2048: five rungs
over 4.7x the training FLOPs per token), so the power check can tell whether the regime can show a gap of the
contrasts' size at all; suites that share runs (the ladder, or the same architecture) reuse them with ``--reuse``.
"""

from __future__ import annotations

from typing import Any

from smoe.eval.suite import Arch, Contrast, Suite, default_contrasts, parse_contrasts
from smoe.upcycling.spec import UpcycleSpec

LADDER_WIDTHS = (128, 256, 512, 1024, 2048)


def ladder(without: int | None = None) -> list[Arch]:
    """Dense rungs of every ladder width but ``without`` (the suite's own dense model, already a rung)."""
    return [Arch(f"dense-{w}", "dense", {"ffn_dim": w}) for w in LADDER_WIDTHS if w != without]


def _moe(label: str, preset: str, overrides: dict[str, Any] | None = None) -> Arch:
    """An MoE architecture whose routed experts' combine weights sum to 1 at initialisation (Arch.match_gate): the
    routed experts then start at the weight of a dense FFN, a shared expert and a renormalised router's, whatever
    their routing. Unmatched, an unnormalised softmax top-6 of 64 starts its routed experts at 0.14 in all, and
    that alone decided MoE against dense in our pilot (docs/results.md)."""
    return Arch(label, preset, overrides or {}, match_gate=True)


def _fine(n_experts: int, k: int, width: int, **extra) -> dict[str, Any]:
    return {"moe.n_routed_experts": n_experts, "moe.top_k": k, "moe.expert_dim": width, **extra}


# table-1's total budget, 16 FFN-equivalents (16 x 512 expert hidden units): DeepSeekMoE holds it as 1 shared and 63
# routed experts of a quarter width, activating 1 + 7 of them (two FFN-equivalents, as GShard's top-2).
DEEPSEEKMOE_TOTAL = _fine(63, 7, 128, **{"moe.n_shared_experts": 1})
SEEDS_PAIR = "the seeds' question: fine-grained experts with shared ones (DeepSeekMoE §3) against Mixtral's few large"

SUITES: dict[str, Suite] = {
    "seeds-debate": Suite(
        [Arch("dense", "dense"), _moe("mixtral-style", "mixtral-style"), _moe("deepseekmoe", "deepseekmoe")],
        contrasts=(
            Contrast("deepseekmoe", "mixtral-style", "active", SEEDS_PAIR + ", at equal activated parameters"),
            Contrast("deepseekmoe", "dense", "active", "MoE against dense at equal activated parameters"),
            Contrast("mixtral-style", "dense", "active", "MoE against dense at equal activated parameters"),
        ),
        ladder=ladder(without=512)),
    # The seeds' pair at table-1's total budget: Mixtral's 8 experts are each twice the dense FFN, so it activates 4
    # FFN-equivalents; DeepSeekMoE activates 2 (1 shared + 7 of 63 quarter-width experts).
    "seeds-debate-total": Suite(
        [Arch("dense", "dense"), _moe("mixtral-style", "mixtral-style", {"moe.expert_dim": 1024}),
         _moe("deepseekmoe", "deepseekmoe", DEEPSEEKMOE_TOTAL)],
        contrasts=(Contrast("deepseekmoe", "mixtral-style", "total", SEEDS_PAIR + ", at equal total parameters"),),
        matching="total", ladder=ladder(without=512)),
    # DeepSeekMoE Table 1 at this size, matched on total parameters as the paper is: every MoE holds 16 x 512 expert
    # hidden units; Hash and Switch activate one FFN-equivalent, GShard and DeepSeekMoE two. Its contrasts are the
    # paper's order, adjacent pairs (Pile loss: Hash 1.932, Switch 1.881, GShard 1.867, DeepSeekMoE 1.808).
    "table-1": Suite([
        Arch("dense", "dense"),
        _moe("hash", "switch", {"moe.routing": "hash", "moe.balance": "none"}),
        _moe("switch", "switch"),
        _moe("gshard", "gshard", {"moe.expert_dim": 512}),
        _moe("deepseekmoe", "deepseekmoe", DEEPSEEKMOE_TOTAL),
    ], contrasts=(
        Contrast("deepseekmoe", "gshard", "total", "DeepSeekMoE Table 1: 1.808 against 1.867"),
        Contrast("gshard", "switch", "total", "DeepSeekMoE Table 1: 1.867 against 1.881"),
        Contrast("switch", "hash", "total", "DeepSeekMoE Table 1: 1.881 against 1.932"),
    ), matching="total", ladder=ladder(without=512)),
    "granularity": Suite([
        # Top-1 renormalised would fix every gate at 1 and cut the router off the LM loss: weight by p, as Switch.
        _moe("E8-k1", "mixtral-style", _fine(8, 1, 512, **{"moe.norm_topk_prob": False})),
        _moe("E16-k2", "mixtral-style", _fine(16, 2, 256)),
        _moe("E32-k4", "mixtral-style", _fine(32, 4, 126)),  # 126 and 62 wide: their routers count (presets)
        _moe("E64-k8", "mixtral-style", _fine(64, 8, 62)),
    ], contrasts=(
        Contrast("E32-k4", "E8-k1", "active", "OLMoE §4.1: 8 experts top-1 to 32 top-4 improves"),
        Contrast("E64-k8", "E32-k4", "active", "OLMoE §4.1: 64 top-8 improves a further 1-2%"),
    ), ladder=ladder()),
    "shared": Suite([
        _moe("shared-0", "deepseekmoe", _fine(64, 8, 62, **{"moe.n_shared_experts": 0})),
        _moe("shared-2", "deepseekmoe"),
    ], contrasts=(Contrast("shared-2", "shared-0", "active",
                           "DeepSeekMoE §4.5: shared experts help; OLMoE §4.1: one shared expert slightly worse"),),
        ladder=ladder()),
    "balance": Suite([
        _moe("seq-aux", "deepseek-v3-style", {"moe.balance": "seq_aux", "moe.seq_aux_loss_coef": 1e-3}),
        _moe("aux-free", "deepseek-v3-style", {"moe.balance": "aux_free", "moe.seq_aux_loss_coef": 0.0}),
    ], contrasts=(Contrast("aux-free", "seq-aux", "active", "DeepSeek-V3 §4.5.3: 2.253 against 2.258"),),
        ladder=ladder()),
    "capacity": Suite([
        _moe("cf-1.0", "gshard", {"moe.capacity_factor": 1.0, "moe.capacity_priority": "choice"}),
        _moe("cf-1.25", "gshard", {"moe.capacity_factor": 1.25, "moe.capacity_priority": "choice"}),
        _moe("dropless", "gshard", {"moe.capacity_factor": None}),
    ], contrasts=(
        Contrast("cf-1.0", "dropless", "active", "GShard/Switch: what dropping tokens at capacity 1.0 costs"),
        Contrast("cf-1.25", "dropless", "active", "Switch's capacity 1.25 against dropless"),
    ), ladder=ladder()),
    # Komatsuzaki et al. 2023's question at this size: after a dense trunk, is upcycling (copy: 8 copies of the FFN,
    # top-2; split: LLaMA-MoE's 16 groups of its hidden units, top-4) better than training the dense model on, for
    # the same tokens? And than the same MoEs trained from scratch? Not matched on parameters: the report also
    # compares by training compute.
    "upcycling": Suite([
        Arch("dense", "dense", from_trunk=True),
        Arch("upcycled-copy", "dense", upcycle=UpcycleSpec("copy", 8, 2), from_trunk=True),
        Arch("upcycled-split", "dense", upcycle=UpcycleSpec("split", 16, 4), from_trunk=True),
        Arch("scratch-copy", "dense", upcycle=UpcycleSpec("copy", 8, 2)),
        Arch("scratch-split", "dense", upcycle=UpcycleSpec("split", 16, 4)),
    ], contrasts=(
        Contrast("upcycled-copy", "dense", "tokens", "Komatsuzaki et al. 2023: upcycled ahead of dense continued"),
        Contrast("upcycled-split", "dense", "tokens", "LLaMA-MoE's split upcycling against dense continued"),
        Contrast("upcycled-copy", "scratch-copy", "tokens", "Komatsuzaki et al. 2023: upcycled ahead of scratch"),
    ), matching="none", trunk=Arch("trunk", "dense")),
    # `make demo`: the whole protocol in about ten minutes on 2 CPU cores: seeds-debate's dense against DeepSeekMoE
    # and the ladder, 4 seeds of short runs (the Makefile's settings). 4 seeds detect 0.10 nats at the pilot's
    # spread; at the demo's length the spread is larger and the power check says the regime is too short.
    "demo": Suite([Arch("dense", "dense"), _moe("deepseekmoe", "deepseekmoe")],
                  contrasts=(Contrast("deepseekmoe", "dense", "active", "MoE against dense at equal activated "
                                                                       "parameters"),),
                  ladder=ladder(without=512), seeds=4),
    # Issue 15: full attention against Qwen3-Next's 3:1 and MiniMax-01's 7:1 hybrids of Gated DeltaNet, on
    # mixtral-style at 8 layers and d 256 (smoe/presets/ablation.py). A Gated DeltaNet layer holds 1.6% more
    # parameters than the attention layer it replaces and, at 128 tokens, 29% more forward FLOPs (its chunked
    # recurrence): the models match within 0.4% on activated parameters, and the hybrids' training FLOPs per token
    # are 4.8% (3:1) and 5.6% (7:1) above full attention's (docs/compare.md). At long context they part ways, which
    # the report's long-context section (smoe.eval.long_context) measures.
    "hybrid": Suite([
        Arch("full-attention", "hybrid-full"),
        Arch("hybrid-3to1", "hybrid-3to1"),
        Arch("hybrid-7to1", "hybrid-7to1"),
    ], contrasts=(
        Contrast("hybrid-3to1", "full-attention", "active", "Qwen3-Next's 3:1 hybrid against full attention"),
        Contrast("hybrid-7to1", "full-attention", "active", "MiniMax-01's 7:1 hybrid against full attention"),
    )),
}


def resolve_suite(suite: str | None, preset_list: str | None, contrasts: str | None = None) -> tuple[str, Suite]:
    """A built-in suite by name, or a custom comparison of ``preset_list`` with ``contrasts`` (``a:b,...``;
    default: each preset against the first)."""
    if (suite is None) == (preset_list is None):
        raise ValueError("compare: give `suite` NAME or `presets` a,b,c (exactly one)")
    if suite is not None:
        if suite not in SUITES:
            raise ValueError(f"suite: unknown suite {suite!r}; known: {', '.join(SUITES)}")
        if contrasts is not None:
            raise ValueError(f"contrasts: suite {suite!r} pre-registers its own; `contrasts` is for `presets`")
        return suite, SUITES[suite]
    names = [n.strip() for n in preset_list.split(",") if n.strip()]
    if len(names) < 2:
        raise ValueError("presets: name at least two presets to compare")
    archs = [Arch(n, n) for n in names]
    chosen = parse_contrasts(contrasts, archs) if contrasts is not None else default_contrasts(archs)
    return "custom", Suite(archs, contrasts=chosen)
