"""What upcycling makes of a dense model, written once: ``UpcycleSpec`` (the ``smoe upcycle`` flags are generated
from its fields) and the MoE config it turns a dense config into. No torch import: the command line and the
head-to-head suites read it without building a model.

    copy   Sparse upcycling (Komatsuzaki et al. 2023, arXiv 2212.05055): every expert is a copy of the dense FFN,
           and a new router is drawn at random. The top-k weights are renormalised to sum to 1, so the MoE computes
           the dense FFN exactly at step 0 whatever the router chooses.
    split  LLaMA-MoE (Zhu et al. 2024, arXiv 2406.16554): the FFN's hidden units are partitioned into ``experts``
           groups of equal size (its neuron-independent expert construction; smoe.upcycling.partition), each group
           an expert. The groups' outputs sum to the dense FFN's, so with every expert active and every weight 1
           the MoE is the dense model. Renormalised top-k weights are scaled by ``experts``
           (``routed_scaling_factor``): a uniform router then gives each chosen group the weight E/K, the dense FFN
           exactly at K = E and, at K < E, the E/K compensation for the groups left out that LLaMA-MoE applies
           (its released models multiply the renormalised scores by score_scale_factor = E/K; with scores summing
           to 1 that is a weight of E/K^2 per group at a uniform router, which is not the dense FFN even at K = E).
           ``shared`` more groups form one always-active shared expert, as Qwen1.5-MoE carved fine-grained routed
           and shared experts out of Qwen-1.8B's FFN (Qwen blog, "Qwen1.5-MoE", 2024); Qwen1.5-MoE scales its
           shared expert by a sigmoid gate, which starts at 1/2 here (a zero gate vector) with the shared down
           projection doubled, so step 0 stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from smoe.config import ModelConfig, MoEConfig
from smoe.config.rules import check_types, fail, non_negative, option, positive

Method = Literal["copy", "split"]
Partition = Literal["random", "clustering"]


@dataclass(frozen=True)
class UpcycleSpec:
    method: Method = field(metadata={"help": "copy: every expert is the dense FFN (Komatsuzaki et al. 2023); split: "
                                             "the FFN's hidden units are partitioned among the experts (LLaMA-MoE)"})
    experts: int = field(metadata={"help": "routed experts per MoE layer"})
    top_k: int = field(metadata={"help": "routed experts each token uses (at least 2, so that the LM loss reaches "
                                         "the router)"})
    partition: Partition = option(
        "random", "with `method` split, how the hidden units are grouped: random (equal random groups) or clustering "
                  "(balanced k-means on the gate projection's rows), LLaMA-MoE's neuron-independent constructions")
    shared: int = option(
        0, "with `method` split, groups of hidden units that form one always-active shared expert (Qwen1.5-MoE)")
    noise: float = option(
        0.0, "Gaussian noise added to every expert weight, its standard deviation relative to the dense matrix's "
             "own (0: the upcycled model starts as the dense one where the method allows)")
    seed: int = option(0, "seeds the partition, the new router weights and the noise")

    @property
    def exact(self) -> bool:
        """Whether the upcycled model computes the dense one at step 0: a copy, or a split with every expert
        active, without noise (split with top_k < experts leaves groups out)."""
        return self.noise == 0 and (self.method == "copy" or self.top_k == self.experts)

    def validate(self) -> "UpcycleSpec":
        check_types(self, "")  # the Literal fields included
        positive("experts", self.experts)
        positive("top_k", self.top_k)
        if self.top_k > self.experts:
            fail("top_k", f"must not exceed experts ({self.experts}), got {self.top_k}")
        if self.top_k < 2:
            fail("top_k", "must be at least 2: the renormalised weight of a single expert is a constant, so the LM "
                          "loss would never reach the router")
        non_negative("shared", self.shared)
        non_negative("noise", self.noise)
        non_negative("seed", self.seed)
        if self.method == "copy" and (self.shared or self.partition != "random"):
            fail("shared" if self.shared else "partition", "applies to method 'split' only (copy takes every hidden "
                                                           "unit into every expert)")
        return self

    def config(self, dense: ModelConfig) -> ModelConfig:
        """The MoE config upcycling ``dense`` gives: every FFN layer an MoE layer, the rest unchanged. Raises
        naming the field when ``dense`` cannot be upcycled this way, before any weights are read."""
        self.validate()
        if dense.moe is not None:
            raise ValueError("upcycle: the source model is already an MoE (its config sets moe); upcycling starts "
                             "from a dense model")
        if dense.layout.n_mtp_modules:
            fail("layout.n_mtp_modules", "upcycling covers the main blocks only; the source has multi-token "
                                         "prediction modules")
        ffn, groups = dense.ffn_dim, self.experts + self.shared
        if self.method == "copy":
            moe = MoEConfig(n_routed_experts=self.experts, top_k=self.top_k, expert_dim=ffn)
        else:
            if ffn % groups:
                fail("experts", f"the dense FFN's {ffn} hidden units do not split into {self.experts} routed + "
                                f"{self.shared} shared groups of equal size ({ffn} is not a multiple of {groups})")
            width = ffn // groups
            moe = MoEConfig(n_routed_experts=self.experts, top_k=self.top_k, expert_dim=width,
                            routed_scaling_factor=float(self.experts), n_shared_experts=1 if self.shared else 0,
                            shared_expert_dim=self.shared * width if self.shared else None,
                            shared_expert_gate=bool(self.shared))
        return replace(dense, moe=moe, name=f"{dense.name}-upcycled-{self.method}").validate()
