"""Hybrid models (layout.layer_types): linear-attention layers beside full attention train, decode from a cache
that holds recurrent states (updated in place), keep rows independent in a batch and packed documents apart, and
are accounted exactly."""

import contextlib
import itertools
from dataclasses import replace

import pytest
import torch

from smoe.accounting import account, kv_cache_elements, recurrent_state_bytes
from smoe.config import (
    AttentionConfig,
    LayoutConfig,
    LinearAttentionConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    ResidualConfig,
    hybrid_layer_types,
)
from smoe.generation import Engine, Request, generate
from smoe.models.transformer import Transformer, document_starts
from smoe.nn import linear_layers
from smoe.nn.linear_attention import gated_delta_rule
from smoe.train.loop import evaluate

KINDS = pytest.mark.parametrize("kind", ["lightning", "gated_delta", "kda"])


def _config(kind: str, n_layers: int = 4, full_every: int = 2) -> ModelConfig:
    """A tiny model in the style of the family each kind comes from: MiniMax-01 (lightning, scaled residual),
    Qwen3-Next (gated delta, output-gated attention with partial rope), Kimi Linear (kda, NoPE MLA)."""
    linear = LinearAttentionConfig(kind=kind, n_heads=4, n_k_heads=2 if kind == "gated_delta" else None, head_dim=8,
                                   chunk=4)
    if kind == "kda":
        attention = MLAConfig(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                              rotary=False)
    else:
        qwen = kind == "gated_delta"
        attention = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, rotary_dim=4 if qwen else None,
                                    output_gate=qwen, qk_norm="head")
    residual = ResidualConfig(1.7, 1.0, 1.7, 1.0, 1.7, 1.0) if kind == "lightning" else None
    types = hybrid_layer_types(n_layers, full_every)
    return ModelConfig(vocab_size=61, dim=32, n_layers=n_layers, ffn_dim=48, max_seq_len=64, attention=attention,
                       linear_attention=linear if "linear_attention" in types else None,
                       moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=16),
                       layout=LayoutConfig(first_k_dense=1, layer_types=types), residual=residual, name=kind).validate()


def _model(kind: str, seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_config(kind, **kwargs)).eval()


@KINDS
def test_every_parameter_of_a_hybrid_model_gets_a_gradient(kind):
    model = _model(kind).train()
    ids = torch.randint(0, 61, (2, 11))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    idle = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not idle


@KINDS
def test_decoding_from_the_cache_equals_one_forward(kind):
    model = _model(kind)
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        whole = model(ids).logits
        cache = model.new_cache(2, 20)
        pieces = [model(ids[:, :6], cache=cache).logits]  # a chunked prefill (chunk 4) then token by token
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-4, atol=1e-5)


@KINDS
def test_a_batch_generates_each_prompt_as_it_would_alone(kind):
    model = _model(kind)
    prompts = [[3, 14, 15, 9, 26], [5, 35], [8, 9, 7, 9, 32, 38, 46, 26]]
    together = generate(model, prompts, max_new_tokens=6, decode_rows=4)
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=6, decode_rows=4)
        assert together[b].tolist() == alone[0].tolist()


@KINDS
def test_the_in_place_decode_step_generates_the_specs_tokens(kind, monkeypatch):
    model = _model(kind)
    prompts = [[3, 14, 15, 9, 26], [5, 35], [8, 9, 7, 9, 32, 38, 46, 26]]
    in_place = generate(model, prompts, max_new_tokens=8, decode_rows=4)

    def spec_step(q, k, v, g, beta, state, scale=None):  # the token-by-token spec, its state copied back
        out, final = gated_delta_rule(q, k, v, g, beta, state, scale)
        state.copy_(final)
        return out

    monkeypatch.setattr(linear_layers, "gated_delta_step_", spec_step)
    assert torch.equal(generate(model, prompts, max_new_tokens=8, decode_rows=4), in_place)


EOS = 0
# Two rows of three documents each, every one ended by EOS; lengths cross the layers' chunks of 4
DOCS = [[[3, 14, 15, 9, 26], [5, 35, 8, 9, 7, 9, 32, 38, 46], [2, 7, 33]],
        [[44, 1], [6, 28, 30, 12, 59, 3, 3, 41, 17, 5, 8], [19, 23, 4, 50]]]


@pytest.mark.parametrize("kind, full_every, mask", [("lightning", 2, True), ("gated_delta", 2, True),
                                                    ("kda", 2, True), ("gated_delta", 1, True), ("kda", 5, False)],
                         ids=["lightning", "gated_delta", "kda", "softmax-only", "linear-only-unmasked"])
def test_a_packed_batch_computes_each_document_as_alone(kind, full_every, mask):
    # softmax-only: GQA with partial rope, qk-norm and the output gate; kda's full layers are NoPE MLA. Linear layers
    # reset at a document start whatever the mask; with mask=False softmax attention would see across documents
    model = _model(kind, full_every=full_every)
    docs = [[torch.tensor(d + [EOS]) for d in row] for row in DOCS]
    ids = torch.stack([torch.cat(row) for row in docs])
    with torch.no_grad():
        packed = model(ids, document_starts=document_starts(ids, EOS), document_mask=mask).logits
        joined = model(ids).logits
        for b, row in enumerate(docs):
            alone = torch.cat([model(d[None]).logits[0] for d in row])
            torch.testing.assert_close(packed[b], alone, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(joined[b], alone, rtol=1e-4, atol=1e-5)  # unmarked, documents do leak


def test_evaluation_keeps_packed_documents_apart():
    model = _model("gated_delta")
    row = torch.tensor([t for doc in DOCS[0] for t in doc + [EOS]] + [11])
    batches = [(row[None, :-1], row[None, 1:])]
    ends = [0] + [i + 1 for i, t in enumerate(row[:-1].tolist()) if t == EOS]  # each document with its EOS
    alone = [(row[None, a:b], row[None, a + 1 : b + 1]) for a, b in itertools.pairwise(ends)]
    packed = evaluate(model, batches, 100, torch.device("cpu"), contextlib.nullcontext(), EOS, "all")
    separate = evaluate(model, alone, 100, torch.device("cpu"), contextlib.nullcontext())
    assert packed["val_loss"] == pytest.approx(separate["val_loss"], rel=1e-5)
    joined = evaluate(model, batches, 100, torch.device("cpu"), contextlib.nullcontext(), EOS, "none")
    assert joined["val_loss"] != pytest.approx(separate["val_loss"], rel=1e-5)


def test_document_starts_need_unpadded_rows_without_a_cache():
    model, ids = _model("kda"), torch.tensor([[1, EOS, 2, 3]])
    with pytest.raises(ValueError, match="^document_starts: packed documents are for unpadded rows"):
        model(ids, attention_mask=torch.ones_like(ids), document_starts=document_starts(ids, EOS))
    with pytest.raises(ValueError, match="^document_starts: shape"):
        model(ids, document_starts=torch.zeros(1, 3, dtype=torch.bool))


@KINDS
def test_a_reused_row_starts_from_a_clear_state(kind):
    model = _model(kind)
    engine = Engine(model, rows=1, max_len=32)
    for prompt in ([1, 2, 3, 4, 5, 6], [7, 8, 9]):
        request = Request(prompt, max_new_tokens=5)
        engine.add(request)
        while not request.done:
            engine.prefill() if engine.prefilling else engine.decode()
    assert request.tokens == generate(model, [[7, 8, 9]], max_new_tokens=5)[0].tolist()


@KINDS
def test_accounting_counts_every_parameter_and_the_state(kind):
    config = _config(kind)
    model = Transformer(config)
    acc = account(config)
    assert acc.total_params == sum(p.numel() for p in model.parameters())
    assert acc.n_linear_layers == 2
    cache = model.new_cache(1, 16, dtype=torch.bfloat16)  # the states stay fp32, the rest is bf16
    assert cache.nbytes == kv_cache_elements(config, 16) * 2 + recurrent_state_bytes(config, "bf16")


def test_linear_layers_hold_the_same_memory_at_every_context():
    model = _model("gated_delta", full_every=4)
    short, long = model.new_cache(1, 8), model.new_cache(1, 64)
    assert sum(block.is_linear for block in model.layers) == 3
    grown = long.nbytes - short.nbytes
    assert grown == kv_cache_elements(_config("gated_delta", full_every=4), 56) * 4  # the one full layer's keys


def test_a_model_of_linear_layers_only_needs_no_attention_cache():
    model = _model("kda", full_every=5)  # 4 layers, none full
    cache = model.new_cache(2, 16)
    assert all(block.is_linear for block in model.layers)
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cache=cache).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert kv_cache_elements(model.config, 16) == 0


@pytest.mark.parametrize("change, message", [
    ({"linear_attention": None}, "linear_attention: must be set"),
    ({"layout": LayoutConfig()}, "linear_attention: is set but no layer uses it"),
    ({"layout": LayoutConfig(layer_types=("full_attention",) * 3)}, "layout.layer_types: needs one entry per layer"),
    ({"linear_attention": LinearAttentionConfig(kind="lightning", v_head_dim=16)},
     "linear_attention.v_head_dim: only 'gated_delta' sets it"),
    ({"linear_attention": LinearAttentionConfig(n_heads=6, n_k_heads=4)}, "linear_attention.n_k_heads: must divide"),
    ({"residual": ResidualConfig(ffn_beta=0.0)}, "residual.ffn_beta: must be a positive number"),
])
def test_a_bad_hybrid_config_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        replace(_config("gated_delta"), **change).validate()


def test_a_hybrid_config_round_trips_through_json():
    for kind in ("lightning", "gated_delta", "kda"):
        config = _config(kind)
        assert ModelConfig.from_json(config.to_json()) == config
