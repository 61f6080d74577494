import pytest
import torch

from smoe.config import AttentionConfig, LayoutConfig, MLAConfig, ModelConfig, MoEConfig
from smoe.models import IGNORE_INDEX, build_model
from smoe.nn import CacheMode, MixerStep

V = 64


def _config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=V, dim=32, n_layers=2, ffn_dim=64, max_seq_len=32,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=16),
    )
    return ModelConfig(**{**base, **changes})


def _mla_config(**changes) -> ModelConfig:
    return _config(
        attention=MLAConfig(n_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                            v_head_dim=8),
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=16, score_func="sigmoid", balance="aux_free",
                      n_group=2, topk_group=1, n_shared_experts=1),
        **changes,
    )


def _ids(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [_config, _mla_config], ids=["gqa", "mla"])
def test_forward_backward_and_loss_composition(make):
    torch.manual_seed(0)
    model = build_model(make())
    ids = _ids()
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert out.logits.shape == (2, 11, V)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"
    assert sorted(out.router_stats) == [0, 1]


def test_ignore_index_positions_do_not_count():
    torch.manual_seed(0)
    model = build_model(_config())
    ids = _ids()
    labels = ids.clone()
    labels[:, 6:] = IGNORE_INDEX
    full = model(ids[:, :6], labels=ids[:, :6]).lm_loss
    masked = model(ids, labels=labels).lm_loss
    torch.testing.assert_close(full, masked)  # causal: the first six positions see the same inputs


@pytest.mark.parametrize("make", [_config, _mla_config], ids=["gqa", "mla"])
def test_logits_are_causal(make):
    torch.manual_seed(0)
    model = build_model(make()).eval()
    ids = _ids(B=1)
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % V
    torch.testing.assert_close(model(ids).logits[:, :8], model(changed).logits[:, :8])


def test_sliding_window_limits_what_a_position_sees():
    torch.manual_seed(0)
    model = build_model(_config(n_layers=1, attention=AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=3)))
    ids = _ids(B=1)
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, 3:], b[:, 3:])  # position 3 no longer sees position 0
    assert not torch.allclose(a[:, :3], b[:, :3])


def test_tied_embeddings_share_the_matrix():
    model = build_model(_config(tie_embeddings=True))
    assert model.head is None and not any(n.startswith("head") for n, _ in model.named_parameters())
    model(_ids(T=4)).logits.sum().backward()
    assert (model.embed.weight.grad.abs().sum(-1) > 0).all()  # every row is used as an output projection


def test_dense_model_has_no_router_stats_and_zero_aux():
    model = build_model(_config(moe=None))
    out = model(_ids(), labels=_ids())
    assert out.router_stats == {} and out.aux_loss.item() == 0


def test_mtp_adds_weighted_loss_and_reports_its_router():
    torch.manual_seed(0)
    config = _mla_config(layout=LayoutConfig(first_k_dense=1, n_mtp_modules=2, mtp_loss_coef=0.3))
    model = build_model(config)
    ids = _ids(T=16)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + 0.3 * out.mtp_loss)
    assert sorted(out.router_stats) == [1, 2, 3]  # MoE layer 1, then MTP depths at n_layers + d - 1
    out.loss.backward()
    assert model.mtp[1].proj.weight.grad.abs().sum() > 0


def test_expert_backend_switch_changes_nothing_but_speed():
    torch.manual_seed(0)
    model = build_model(_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    model.set_expert_backend("reference")
    ref = model(ids).logits
    model.set_expert_backend("auto")
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_update_expert_biases_moves_only_aux_free_biases():
    torch.manual_seed(0)
    model = build_model(_mla_config(layout=LayoutConfig(first_k_dense=1)))
    out = model(_ids())
    model.update_expert_biases({i: s.load for i, s in out.router_stats.items()})
    bias = model.layers[1].ffn.router.expert_bias
    load = out.router_stats[1].load.float()
    torch.testing.assert_close(bias, 1e-3 * torch.sign(load.mean() - load))
    assert "layers.1.ffn.router.expert_bias" in model.state_dict()


def test_sequence_over_max_seq_len_is_a_clear_error():
    model = build_model(_config(max_seq_len=8))
    with pytest.raises(ValueError, match=r"sequence length 12 exceeds max_seq_len \(8\)"):
        model(_ids())


def _mtp_loss_by_hand(model, input_ids, labels, next_ids_of):
    """DeepSeek-V3 MTP from the modules, depth by depth; ``next_ids_of(d)`` is the token fed at depth d."""
    T = input_ids.shape[1]
    cos, sin = model.rope(torch.arange(T))
    h = model.embed(input_ids)
    for block in model.layers:
        h, _ = block(h, MixerStep(cos=cos, sin=sin))
    losses = []
    for d, module in enumerate(model.mtp, start=1):
        h, _ = module(h[:, : T - d], model.embed(next_ids_of(d)), MixerStep(cos=cos[: T - d], sin=sin[: T - d]))
        logits = model._logits(module.norm(h))
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, d:].flatten(),
                                                        ignore_index=IGNORE_INDEX))
    return torch.stack(losses).mean()


def test_mtp_reads_its_input_tokens_from_input_ids_not_labels():
    torch.manual_seed(0)
    model = build_model(_config(layout=LayoutConfig(n_mtp_modules=2)))
    ids = _ids(T=16)
    input_ids, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[0, 3:6] = IGNORE_INDEX  # e.g. a masked prompt: its tokens are still the MTP modules' inputs
    labels[1, 9] = IGNORE_INDEX
    with torch.no_grad():
        got = model(input_ids, labels=labels).mtp_loss
        want = _mtp_loss_by_hand(model, input_ids, labels, lambda d: input_ids[:, d:])
        from_labels = _mtp_loss_by_hand(model, input_ids, labels, lambda d: labels[:, d - 1 : -1].clamp_min(0))
    torch.testing.assert_close(got, want)
    assert (got - from_labels).abs() > 1e-4  # reading the -100 positions as token 0 is measurably different


def test_mtp_with_next_token_labels_is_unchanged():
    # With labels = input_ids shifted and no -100, token t+d is labels[t+d-1]: trained checkpoints keep their loss.
    torch.manual_seed(0)
    model = build_model(_config(layout=LayoutConfig(n_mtp_modules=2)))
    ids = _ids(T=16)
    input_ids, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        got = model(input_ids, labels=labels).mtp_loss
        from_labels = _mtp_loss_by_hand(model, input_ids, labels, lambda d: labels[:, d - 1 : -1])
    assert torch.equal(got, from_labels)


def _hash_config(**changes) -> ModelConfig:
    return _config(moe=MoEConfig(n_routed_experts=4, top_k=1, expert_dim=16, routing="hash", balance="none"),
                   **changes)


def test_hash_routing_sends_a_token_id_to_one_fixed_expert_with_weight_one():
    from smoe.moe.router import hash_experts

    torch.manual_seed(0)
    model = build_model(_hash_config())
    layer = model.moe_layers[0]
    assert layer.router.weight is None and not any("router" in n for n, _ in model.named_parameters())
    traced = []
    layer.router.register_forward_hook(lambda m, args, routing: traced.append(routing))
    ids = _ids()
    ids[:, ::3] = ids[0, 0]  # a token that recurs in both rows, at several positions
    model(ids, labels=ids)
    routing = traced[0]
    assert torch.equal(routing.expert_ids_A, hash_experts(ids.reshape(-1), 4))
    assert torch.equal(routing.weights_A, torch.ones(ids.numel()))
    flat = ids.reshape(-1)
    recurring = [int(t) for t in flat.unique() if (flat == t).sum() > 1]
    assert int(ids[0, 0]) in recurring
    for token in recurring:  # every occurrence of a token goes where its other occurrences go
        assert routing.expert_ids_A[flat == token].unique().numel() == 1, token
    assert len(set(hash_experts(torch.arange(4096), 4).tolist())) == 4  # the hash reaches every expert


def test_hash_routed_model_trains_and_decodes_like_its_full_forward():
    torch.manual_seed(0)
    model = build_model(_hash_config())
    ids = _ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # every weight is reached, none is a router's
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 16)
        prefix = model(ids[:, :8], cache=cache).logits
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes, match", [
    ({"balance": "aux"}, "moe.balance: must be 'none' with hash routing"),
    ({"balance": "none", "top_k": 2}, "moe.routing: hash routing .* is top-1"),
])
def test_hash_routing_refuses_what_it_cannot_do(changes, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(n_routed_experts=4, routing="hash", **{"top_k": 1, **changes}).validate()


def test_hash_layer_router_has_no_parameters_in_the_accounting():
    from smoe.accounting import account

    hashed, learned = account(_hash_config()), account(_config(moe=MoEConfig(n_routed_experts=4, top_k=1,
                                                                              expert_dim=16, norm_topk_prob=False)))
    assert learned.total_params - hashed.total_params == 2 * 4 * 32  # two layers of a 4 x 32 router
    assert sum(p.numel() for p in build_model(_hash_config()).parameters()) == hashed.total_params


def test_a_mixer_step_names_what_its_mode_needs():
    with pytest.raises(ValueError, match="^spans: "):
        MixerStep(CacheMode.CHUNKS)
    with pytest.raises(ValueError, match="^slots_B: "):
        MixerStep(CacheMode.STEP)


MIXERS = {"mixtral-tiny": {"Attention"}, "deepseek-v3-tiny": {"MLA"}, "qwen3-next-tiny": {"Attention", "GatedDeltaNet"},
          "minimax-text-01-tiny": {"Attention", "LightningAttention"},
          "kimi-linear-tiny": {"KimiDeltaAttention", "MLA"}}


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_token_mixer_is_called_and_makes_its_cache_the_same_way(name):
    from smoe import presets

    config = presets.get(name)
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert {type(block.attn).__name__ for block in model.layers} == MIXERS[name]
    cache = model.new_cache(2, 8, independent_rows=False)
    x = torch.randn(2, 3, config.dim)
    cos, sin = model.rope(torch.arange(3))
    with torch.no_grad():
        for block, layer in zip(model.layers, cache.layers, strict=True):
            whole = block.attn(x, MixerStep(cos=cos, sin=sin))
            chunks = block.attn(x, MixerStep(CacheMode.CHUNKS, cos, sin, spans=[(0, 3), (0, 3)]), layer)
            torch.testing.assert_close(chunks, whole, rtol=1e-5, atol=1e-5)  # a fresh cache continues nothing
            assert layer.nbytes > 0
