"""The linear-attention recurrences and the layers around them: the chunked form and the in-place decode step
against the token-by-token spec, forward and backward; precision under autocast and strong forgets against a
float64 spec; what the chunked form and the step allocate; decoding from a cache against one forward; left padding
and packed documents; and parity with transformers' own torch recurrences and attention modules (Qwen3-Next, Kimi
Linear, MiniMax-01) on tiny random weights."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from smoe.interop.families.minimax import lightning_pieces
from smoe.interop.families.qwen3_next import gated_delta_pieces
from smoe.nn.linear_attention import SUB_CHUNK, chunked_gated_delta_rule, gated_delta_rule, gated_delta_step_
from smoe.nn.linear_layers import GatedDeltaNet, KimiDeltaAttention, LightningAttention
from smoe.nn.mixer import MixerStep

B, H, K, V = 2, 3, 8, 6


def _inputs(T: int, seed: int = 0, delta: bool = True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g) for _ in range(2))
    k = F.normalize(k, dim=-1)  # as Gated DeltaNet's keys (L2-normalised): the delta rule is stable for |k| <= 1
    v = torch.randn(B, T, H, V, generator=g)
    log_decay = -torch.rand(B, T, H, generator=g)  # a in (e^-1, 1]
    beta = torch.rand(B, T, H, generator=g) if delta else None
    state = torch.randn(B, H, K, V, generator=g)
    return q, k, v, log_decay, beta, state


def _chunked_equals_spec(inputs, chunk: int) -> None:
    """The chunked form against the spec on ``inputs`` (q, k, v, g, beta or None, state): outputs, final state and
    every input's gradient."""
    results = {}
    for name, fn, kwargs in (("spec", gated_delta_rule, {}), ("chunked", chunked_gated_delta_rule, {"chunk": chunk})):
        leaves = [x.clone().requires_grad_() if x is not None else None for x in inputs]
        out, state = fn(*leaves[:5], state_BHKV=leaves[5], **kwargs)
        (out.square().sum() + state.square().sum()).backward()
        results[name] = (out, state, [x.grad for x in leaves if x is not None])
    (out, state, grads), (out_c, state_c, grads_c) = results["spec"], results["chunked"]
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state_c, state, rtol=1e-4, atol=1e-4)
    for grad_c, grad in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(grad_c, grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("delta", [True, False], ids=["gated-delta", "decayed-linear"])
@pytest.mark.parametrize("T, chunk", [(13, 4), (16, 16), (7, 1), (5, 64)])
def test_chunked_form_equals_the_recurrence_forward_and_backward(delta, T, chunk):
    _chunked_equals_spec(_inputs(T, delta=delta), chunk)


def test_a_prefills_state_continues_into_token_by_token_decoding():
    q, k, v, g, beta, _ = _inputs(12)
    full, _ = chunked_gated_delta_rule(q, k, v, g, beta, chunk=4)
    _, state = chunked_gated_delta_rule(q[:, :9], k[:, :9], v[:, :9], g[:, :9], beta[:, :9], chunk=4)
    steps = []
    for t in range(9, 12):
        o, state = gated_delta_rule(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                    beta[:, t : t + 1], state)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-5, atol=1e-5)


def test_the_gated_delta_rule_matches_transformers_qwen3_next():
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta, state = _inputs(11, seed=3)
    ours, ours_state = gated_delta_rule(q, k, v, g, beta, state)
    for fn, kwargs in ((qwen3_next.torch_recurrent_gated_delta_rule, {}),
                       (qwen3_next.torch_chunk_gated_delta_rule, {"chunk_size": 4})):
        theirs, theirs_state = fn(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_state, theirs_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, chunk, rate", [(13, 4, 1), (6, 1, 1), (9, 16, 1), (100, 64, 1), (70, 32, 1),
                                            (50, 48, 1), (70, 64, 30)])
def test_a_decay_per_key_channel_chunks_as_its_recurrence_forward_and_backward(T, chunk, rate):
    # Kimi Delta Attention: g is (B, T, H, K), each row of the state decaying on its own; chunks of 32 or more are
    # cut into sub-chunks of 16 (partly filled at T 50, 70, 100), and rate 30 makes decays strong enough to floor
    q, k, v, _, beta, state = _inputs(T, seed=6)
    g = -rate * torch.rand(B, T, H, K, generator=torch.Generator().manual_seed(7))
    _chunked_equals_spec((q, k, v, g, beta, state), chunk)


class _TensorsMade(TorchDispatchMode):
    """Records the element count of every tensor an op makes: not its inputs, views of them, or what an in-place op
    writes into them."""

    def __init__(self):
        super().__init__()
        self.sizes = [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        self.sizes += [t.numel() for t in tree_flatten(out)[0]
                       if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs]
        return out


def _largest_tensor_made(fn) -> int:
    with _TensorsMade() as made:
        fn()
    return max(made.sizes)


def test_a_decay_per_key_channel_makes_no_chunk_by_chunk_by_key_tensor():
    # the (C, C, K) pairwise decays of a chunk are what kept Kimi Delta Attention from training at length; its
    # largest tensors, forward and backward, are now the keys scaled once per query sub-chunk
    T, chunk, H_, K_ = 128, 64, 2, 32
    g = torch.Generator().manual_seed(10)
    q, k = torch.randn(1, T, H_, K_, generator=g), F.normalize(torch.randn(1, T, H_, K_, generator=g), dim=-1)
    v, beta = torch.randn(1, T, H_, 8, generator=g), torch.rand(1, T, H_, generator=g)
    log_decay = -torch.rand(1, T, H_, K_, generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, log_decay, beta)]

    def step():
        out, state = chunked_gated_delta_rule(*leaves, chunk=chunk)
        (out.square().sum() + state.square().sum()).backward()

    assert _largest_tensor_made(step) <= chunk // SUB_CHUNK * k.numel() < chunk * k.numel()


def test_the_chunked_forms_allocations_grow_linearly_with_the_length():
    # the scan once indexed each chunk out of whole-sequence tensors, whose backward zero-filled a whole-sequence
    # gradient per chunk: twice the length made 3.5x the elements
    def made(T: int) -> int:
        leaves = [x.requires_grad_() for x in _inputs(T, seed=20)]
        with _TensorsMade() as tensors:
            out, state = chunked_gated_delta_rule(*leaves[:5], leaves[5], chunk=8)
            (out.sum() + state.sum()).backward()
        return sum(tensors.sizes)

    assert made(512) / made(256) < 2.2


def test_a_short_prefill_is_not_padded_to_a_whole_chunk():
    inputs = _inputs(5, seed=11)
    largest = _largest_tensor_made(lambda: chunked_gated_delta_rule(*inputs[:5], inputs[5], chunk=64))
    assert largest <= B * H * SUB_CHUNK * SUB_CHUNK < B * H * 64 * 64  # the pairwise decays of one sub-chunk


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("delta", [True, False], ids=["gated-delta", "decayed-linear"])
def test_the_decode_step_updates_the_state_in_place_as_the_spec_steps(per_channel, delta):
    q, k, v, g, beta, state = _inputs(4, seed=12, delta=delta)
    if per_channel:
        g = -torch.rand(B, 4, H, K, generator=torch.Generator().manual_seed(13))
    g[1, 2] = 0  # row 1 idles at step 2, as padding does (no decay, and no write: beta 0 or k = v = 0)
    if delta:
        beta[1, 2] = 0
    else:
        k[1, 2], v[1, 2] = 0, 0
    want, want_state = gated_delta_rule(q, k, v, g, beta, state)
    cached = state.clone()
    outs, largest = [], 0
    for t in range(4):
        def step(at=slice(t, t + 1)):
            outs.append(gated_delta_step_(q[:, at], k[:, at], v[:, at], g[:, at],
                                          None if beta is None else beta[:, at], cached))

        largest = max(largest, _largest_tensor_made(step))
    torch.testing.assert_close(torch.cat(outs, dim=1), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached, want_state, rtol=1e-6, atol=1e-6)
    assert largest < state.numel()  # no state-sized temporary: the state is scaled and updated where it lies


def _float64_spec(inputs):
    q, k, v, g, beta, state = (x.double() if x is not None else None for x in inputs)
    return gated_delta_rule(q, k, v, g, beta, state)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_under_bf16_autocast_the_recurrences_compute_in_fp32(per_channel):
    q, k, v, g, beta, state = inputs = _inputs(37, seed=14)
    if per_channel:
        g = -torch.rand(B, 37, H, K, generator=torch.Generator().manual_seed(15))
        inputs = (q, k, v, g, beta, state)
    want, want_state = _float64_spec(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = [gated_delta_rule(*inputs), chunked_gated_delta_rule(*inputs[:5], state, chunk=16)]
        cached = state.clone()
        steps = [gated_delta_step_(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                   beta[:, t : t + 1], cached) for t in range(37)]
        results.append((torch.cat(steps, dim=1), cached))
    for out, final in results:
        assert out.dtype == final.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)  # bf16 matmuls: about 2e-3 off
        torch.testing.assert_close(final.double(), want_state, rtol=0, atol=2e-6)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("forget", [-1000.0, -5000.0, float("-inf")])
def test_strong_forgets_cost_the_chunked_form_no_precision(forget, per_channel):
    # a forget at the start of every chunk (fp32 prefix sums lost 7e-5 at -1000 and turned -inf into NaN), and one
    # inside a sub-chunk
    q, k, v, _, beta, state = _inputs(256, seed=16)
    shape = (B, 256, H, K) if per_channel else (B, 256, H)
    g = -0.1 * torch.rand(shape, generator=torch.Generator().manual_seed(17))
    g[:, ::64] = forget
    g[:, 100] = forget
    want, want_state = _float64_spec((q, k, v, g, beta, state))
    out, final = chunked_gated_delta_rule(q, k, v, g, beta, state, chunk=64)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(final.double(), want_state, rtol=0, atol=2e-6)


def test_a_hard_reset_keeps_the_chunked_form_finite_forward_and_backward():
    for per_channel in (False, True):
        q, k, v, _, beta, state = _inputs(40, seed=18)
        g = -torch.rand((B, 40, H, K) if per_channel else (B, 40, H), generator=torch.Generator().manual_seed(19))
        g[:, ::16], g[:, 21] = float("-inf"), float("-inf")  # at chunk starts and inside a chunk
        _chunked_equals_spec((q, k, v, g, beta, state), chunk=16)


def test_a_decay_per_key_channel_matches_transformers_kimi_linear():
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    q, k, v, _, beta, state = _inputs(10, seed=8)
    g = -torch.rand(B, 10, H, K, generator=torch.Generator().manual_seed(9))
    ours, ours_state = gated_delta_rule(q, k, v, g, beta, state)
    for fn, kwargs in ((kimi.recurrent_kimi_delta_attention, {}), (kimi.chunk_kimi_delta_attention, {"chunk_size": 4})):
        theirs, theirs_state = fn(q, k, v, g, beta, initial_state=state, output_final_state=True, **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_state, theirs_state, rtol=1e-5, atol=1e-5)


def test_a_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="^chunk: "):
        chunked_gated_delta_rule(*_inputs(4)[:5], chunk=0)


def _random_weights(module):
    """``module`` in eval mode with every parameter drawn from N(0, 0.3) (transformers' init leaves norms at 1 and
    some projections at 0, which would hide a mismatch)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.eval()


D = 32  # the layers' model dim
# Our layer of each family on a tiny shape; the chunk of 3 divides none of the tests' lengths.
LAYERS = {
    "qwen3-next": lambda chunk: GatedDeltaNet(D, n_k_heads=2, n_v_heads=4, k_dim=8, v_dim=6, chunk=chunk),
    "kimi-linear": lambda chunk: KimiDeltaAttention(D, n_heads=2, head_dim=8, chunk=chunk),
    "minimax": lambda chunk: LightningAttention(D, n_heads=4, head_dim=8, layer=2, n_layers=8, chunk=chunk),
}
FAMILIES = pytest.mark.parametrize("family", list(LAYERS))


def _layer(family: str, chunk: int | None = 3):
    return _random_weights(LAYERS[family](chunk))


def _x(T: int, seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, T, D, generator=torch.Generator().manual_seed(seed))


def _call(layer, x: torch.Tensor, cache=None, **step) -> torch.Tensor:
    """The layer over ``x`` as a block calls it, with a step of ``step``'s fields (real_BT, starts_BT)."""
    return layer(x, MixerStep(**step), cache)


def _copy_pieces(pieces, theirs, ours) -> None:
    """Fill ``ours`` from the transformers module ``theirs`` through the importer's pieces (smoe.interop)."""
    mine, src = ours.state_dict(), theirs.state_dict()
    with torch.no_grad():
        for p in pieces:
            mine[p.ours][p.index].copy_(p.source(src[p.hf]))


def _qwen3_next_twin(ours: GatedDeltaNet):
    """transformers' Qwen3NextGatedDeltaNet shaped as ``ours``, with random weights that are copied into ours."""
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    from transformers import Qwen3NextConfig

    Hk, Hv, Kd, Vd = ours.n_k_heads, ours.n_v_heads, ours.k_dim, ours.v_dim
    config = Qwen3NextConfig(hidden_size=D, linear_num_key_heads=Hk, linear_num_value_heads=Hv,
                             linear_key_head_dim=Kd, linear_value_head_dim=Vd,
                             linear_conv_kernel_dim=ours.conv_weight.shape[1], num_hidden_layers=4,
                             rms_norm_eps=ours.norm_eps)
    theirs = _random_weights(qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0))
    # the importer's split of the fused q, k, v, z and b, a projections (interleaved per key head)
    _copy_pieces(gated_delta_pieces(D, Hk, Hv, Kd, Vd, ours.conv_weight.shape[1], "", ""), theirs, ours)
    return lambda x, mask=None: theirs(x, attention_mask=mask)


def _kimi_linear_twin(ours: KimiDeltaAttention):
    """transformers' KimiLinearDeltaAttention shaped as ``ours``, its random weights copied into ours."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    config = KimiLinearConfig(hidden_size=D, linear_num_heads=ours.n_v_heads, linear_head_dim=ours.k_dim,
                              linear_conv_kernel_dim=ours.conv_weight.shape[1], num_hidden_layers=4,
                              rms_norm_eps=ours.norm_eps)
    theirs = _random_weights(kimi.KimiLinearDeltaAttention(config, layer_idx=0))
    pairs = {"wq": theirs.q_proj, "wk": theirs.k_proj, "wv": theirs.v_proj, "wb": theirs.b_proj, "wo": theirs.o_proj,
             "wf_a": theirs.forget_gate.f_a_proj, "wf_b": theirs.forget_gate.f_b_proj, "wg_a": theirs.g_a_proj,
             "wg_b": theirs.g_b_proj}
    with torch.no_grad():
        for name, module in pairs.items():
            getattr(ours, name).weight.copy_(module.weight)
        ours.conv_weight.copy_(theirs.conv1d.weight[:, 0])
        ours.dt_bias.copy_(theirs.forget_gate.dt_bias)
        ours.A_log.copy_(theirs.forget_gate.A_log.flatten())
        ours.norm_weight.copy_(theirs.o_norm.weight)
    return lambda x, mask=None: theirs(x, attention_mask=mask)


def _minimax_twin(ours: LightningAttention):
    """transformers' MiniMaxLightningAttention shaped as ``ours`` (layer 2 of 8, blocks of 4 tokens), its random
    weights copied into ours."""
    minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    from transformers import MiniMaxConfig

    H_, D_ = ours.n_heads, ours.head_dim
    config = MiniMaxConfig(hidden_size=D, num_attention_heads=H_, head_dim=D_, num_hidden_layers=8, block_size=4,
                           num_key_value_heads=2)
    theirs = _random_weights(minimax.MiniMaxLightningAttention(config, layer_idx=2))
    _copy_pieces(lightning_pieces(D, H_, D_, "", ""), theirs, ours)  # the importer's split of the fused q, k, v
    torch.testing.assert_close(ours.slope.float(), theirs.slope_rate.flatten())
    return lambda x, mask=None: theirs(x, position_embeddings=None, attention_mask=mask)[0]


TWINS = {"qwen3-next": _qwen3_next_twin, "kimi-linear": _kimi_linear_twin, "minimax": _minimax_twin}


@FAMILIES
def test_the_layer_matches_transformers(family):
    ours = _layer(family)
    theirs = TWINS[family](ours)
    x = _x(10, seed=1)  # 10 tokens: a partial last chunk (ours, 3) and block (MiniMax's, 4)
    with torch.no_grad():
        torch.testing.assert_close(_call(ours, x), theirs(x), rtol=1e-4, atol=1e-5)


@FAMILIES
def test_the_layer_matches_transformers_on_a_left_padded_batch(family):
    ours = _layer(family)
    theirs = TWINS[family](ours)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[0, :4] = False
    x = _x(10, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(_call(ours, x, real_BT=real)[real], theirs(x, real)[real], rtol=1e-4, atol=1e-5)


def _random_cache(layer, batch: int, seed: int):
    """A cache as a prefill might leave it: random state and convolution history."""
    cache = layer.new_cache(batch)
    g = torch.Generator().manual_seed(seed)
    cache.state_BHKV = torch.randn(cache.state_BHKV.shape, generator=g)
    if cache.conv_BCW is not None:
        cache.conv_BCW = torch.randn(cache.conv_BCW.shape, generator=g)
    return cache


@FAMILIES
def test_the_chunked_layer_equals_its_spec_forward_and_backward(family):
    chunked = _layer(family, chunk=3)
    spec = copy.deepcopy(chunked)
    spec.chunk = None
    x, cache = _x(11, seed=3), _random_cache(chunked, 2, seed=4)
    results = []
    for layer in (spec, chunked):
        leaf, state = x.clone().requires_grad_(), copy.deepcopy(cache)
        out = _call(layer, leaf, state)
        out.square().sum().backward()
        grads = {name: p.grad for name, p in layer.named_parameters()}
        results.append((out, state, leaf.grad, grads))
    (out, state, x_grad, grads), (out_c, state_c, x_grad_c, grads_c) = results
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state_c.state_BHKV, state.state_BHKV, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_grad_c, x_grad, rtol=1e-4, atol=1e-4)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@FAMILIES
def test_decoding_from_the_cache_equals_one_forward(family):
    layer = _layer(family)
    x = _x(10, seed=5)
    with torch.no_grad():
        full = _call(layer, x)
        cache = layer.new_cache(2)
        steps = [_call(layer, x[:, :7], cache)] + [_call(layer, x[:, t : t + 1], cache) for t in range(7, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@FAMILIES
def test_a_layers_decode_step_updates_its_cache_in_place(family):
    # heads of 32: the state outweighs every other tensor of a step, as it does at real sizes
    layer = _random_weights({
        "qwen3-next": lambda: GatedDeltaNet(D, n_k_heads=1, n_v_heads=2, k_dim=32, v_dim=32),
        "kimi-linear": lambda: KimiDeltaAttention(D, n_heads=2, head_dim=32),
        "minimax": lambda: LightningAttention(D, n_heads=2, head_dim=32, layer=2, n_layers=8),
    }[family]())
    x = _x(6, seed=9)
    with torch.no_grad():
        cache = layer.new_cache(2)
        _call(layer, x[:, :5], cache)
        state = cache.state_BHKV
        largest = _largest_tensor_made(lambda: _call(layer, x[:, 5:], cache))
    assert cache.state_BHKV is state and largest < state.numel()


def _assert_row_cache(cache, row: int, want) -> None:
    """Row ``row`` of ``cache`` against ``want``, a cache of one row."""
    torch.testing.assert_close(cache.state_BHKV[row : row + 1], want.state_BHKV, rtol=1e-5, atol=1e-5)
    if want.conv_BCW is not None:
        torch.testing.assert_close(cache.conv_BCW[row : row + 1], want.conv_BCW, rtol=1e-5, atol=1e-5)


@FAMILIES
def test_a_left_padded_batch_computes_each_row_as_alone(family):
    layer = _layer(family)
    x = _x(9, seed=6)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, :4] = False  # row 0: 4 padding tokens, then 5 real ones
    with torch.no_grad():
        cache, alone = layer.new_cache(2), layer.new_cache(1)
        out = _call(layer, x, cache, real_BT=real)
        torch.testing.assert_close(out[:1, 4:], _call(layer, x[:1, 4:], alone), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], _call(layer, x[1:]), rtol=1e-5, atol=1e-5)
    _assert_row_cache(cache, 0, alone)


@FAMILIES
def test_padding_leaves_a_continuing_rows_cache_untouched(family):
    # after a shared prefill, row 0 has one real token behind two padding ones, then sits out a decode step; it
    # must compute what it computes on its real tokens alone, and row 1 what it computes unpadded
    layer = _layer(family)
    x = _x(10, seed=7)
    with torch.no_grad():
        cache = layer.new_cache(2)
        _call(layer, x[:, :6], cache)
        chunk = _call(layer, x[:, 6:9], cache, real_BT=torch.tensor([[False, False, True], [True, True, True]]))
        step = _call(layer, x[:, 9:], cache, real_BT=torch.tensor([[False], [True]]))
        alone = layer.new_cache(1)
        row0 = _call(layer, torch.cat([x[:1, :6], x[:1, 8:9]], dim=1), alone)
        row1 = _call(layer, x[1:])
    torch.testing.assert_close(chunk[0, 2], row0[0, 6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([chunk[1:], step[1:]], dim=1), row1[:, 6:], rtol=1e-5, atol=1e-5)
    _assert_row_cache(cache, 0, alone)


@FAMILIES
def test_packed_documents_compute_as_alone_and_leave_the_last_ones_cache(family):
    # documents of 5, 2 (shorter than the convolution's history) and 5 tokens, starting inside chunks of 3
    layer = _layer(family)
    x = _x(12, seed=10, batch=1)
    starts = torch.zeros(1, 12, dtype=torch.bool)
    starts[0, [5, 7]] = True
    with torch.no_grad():
        cache, alone = _random_cache(layer, 1, seed=11), layer.new_cache(1)
        packed = _call(layer, x, cache, starts_BT=starts)
        first = _call(layer, x[:, :5], _random_cache(layer, 1, seed=11))  # the first document continues the cache
        documents = torch.cat([first, _call(layer, x[:, 5:7]), _call(layer, x[:, 7:], alone)], dim=1)
    torch.testing.assert_close(packed, documents, rtol=1e-5, atol=1e-5)
    _assert_row_cache(cache, 0, alone)


def test_padding_after_a_real_token_is_refused():
    with pytest.raises(ValueError, match="^real_BT: "):
        _call(_layer("qwen3-next"), _x(3, seed=8, batch=1), real_BT=torch.tensor([[True, True, False]]))
