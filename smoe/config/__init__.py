"""Model configuration: small frozen dataclasses grouped by concern, JSON round-trip, validate().

No torch import here: configs are read by the CLI, accounting and interop without building a model.

    ModelConfig                                                                       (model.py)
      attention: AttentionConfig (GQA/MHA) | MLAConfig (DeepSeek-V2/V3 multi-head latent attention)  (attention.py)
      linear_attention: LinearAttentionConfig | None (the linear layers of a hybrid model: MiniMax-01, Qwen3-Next,
                 Kimi Linear; layout.layer_types says which layers)                   (attention.py)
      moe:       MoEConfig | None (None: a dense model)
      layout:    LayoutConfig (which layers are MoE or linear attention, Arctic's dense residual, DeepSeek-V3 MTP)
      residual:  ResidualConfig | None (MiniMax-01's scaled residual on the normalised input)
      quantization: QuantConfig | None (weight-only int8/int4 for inference; None: full precision)

``rules.py`` says how a field is checked; every ``validate()`` raises ``ValueError`` naming the field and the rule it
broke. ``ModelConfig.validate()`` checks the whole tree, so a config that validates builds a model. Import configs
from here (``from smoe.config import ModelConfig``); the submodules are the package's own layout.
"""

from smoe.config.attention import (
    AttentionConfig,
    LinearAttentionConfig,
    LinearKind,
    MLAConfig,
    QKNorm,
    RopeScaling,
    RopeType,
)
from smoe.config.model import (
    DEFAULT_INT4_GROUP,
    INT4_GROUP_SIZES,
    Activation,
    Balance,
    CapacityPriority,
    GroupScore,
    LayerType,
    LayoutConfig,
    ModelConfig,
    MoEConfig,
    Norm,
    QuantConfig,
    QuantScheme,
    ResidualConfig,
    Routing,
    ScoreFunc,
    hybrid_layer_types,
    override,
)

__all__ = [
    "DEFAULT_INT4_GROUP", "INT4_GROUP_SIZES", "Activation", "AttentionConfig", "Balance", "CapacityPriority",
    "GroupScore", "LayerType", "LayoutConfig", "LinearAttentionConfig", "LinearKind", "MLAConfig", "ModelConfig",
    "MoEConfig", "Norm", "QKNorm", "QuantConfig", "QuantScheme", "ResidualConfig", "RopeScaling", "RopeType", "Routing",
    "ScoreFunc", "hybrid_layer_types", "override",
]
