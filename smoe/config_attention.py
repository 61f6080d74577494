"""Former home of the token mixers' configs, kept so that existing imports work: they live in smoe.config.attention
(import them from smoe.config)."""

from smoe.config.attention import (  # noqa: F401 (re-exported)
    AttentionConfig,
    LinearAttentionConfig,
    LinearKind,
    MLAConfig,
    QKNorm,
    RopeScaling,
    RopeType,
)
