"""Weight-only quantisation (smoe.quant, smoe.kernels' quantised backends): the format and its error bound, each
fast kernel (C++, numba) against the dequantise-then-matmul spec, the fallbacks without them, checkpoints,
generation, errors."""

import json

import pytest
import torch
from backend_params import of, params

import smoe
from smoe import kernels, presets
from smoe.cli import main
from smoe.config import QuantConfig
from smoe.interop.hf import save_model_checkpoint
from smoe.kernels import Assignments, cpp_experts, cpp_quant
from smoe.models import build_model
from smoe.moe import MoELayer
from smoe.quant.format import (
    QWeight,
    dequantize,
    int4_group,
    int8_activations,
    pack_int4,
    quantize_activations,
    quantize_weight,
    unpack_int4,
)
from smoe.quant.modules import QuantizedLinear

CPU = torch.device("cpu")
SCHEMES = {"int8": QuantConfig("int8"), "int4-g32": QuantConfig("int4", 32), "int4-g64": QuantConfig("int4", 64)}
needs_numba = pytest.mark.skipif(not kernels.HAS_NUMBA, reason="numba is not installed (the fast path is optional)")
TINY = {"dim": 64, "n_layers": 2, "ffn_dim": 128, "vocab_size": 256, "moe.expert_dim": 64, "max_seq_len": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset="mixtral-tiny", **changes):
    torch.manual_seed(0)
    return build_model(presets.get(preset, **{**TINY, **changes})).eval()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantised_weights_lie_within_half_a_step(scheme):
    config = SCHEMES[scheme]
    w = torch.randn(3, 24, 128) * torch.rand(3, 24, 1)  # stacked like experts, rows of different ranges
    w[0, 0] = 0  # an all-zero row: scale 0, still exact
    q = quantize_weight(w, config)
    step = q.scale[..., None] if config.scheme == "int8" else q.scale.repeat_interleave(config.group_size, dim=-1)
    assert ((dequantize(q) - w).abs() <= step / 2 + 1e-6).all()
    assert dequantize(q)[0, 0].eq(0).all()
    assert q.qweight.dtype == (torch.int8 if config.scheme == "int8" else torch.uint8)
    assert q.qweight.shape[-1] == 128 // (1 if config.scheme == "int8" else 2)


def test_int4_packing_is_its_own_inverse_and_groups_fit_odd_widths():
    q = torch.randint(0, 16, (5, 4, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q), 64), q)
    assert pack_int4(q)[0, 0] == q[0, 0, 0] | (q[0, 0, 32] << 4)  # byte j: inputs j and j + G/2
    assert int4_group(256, 64) == 64 and int4_group(96, 64) == 48 and int4_group(40, 128) == 40
    with pytest.raises(ValueError, match="even number of inputs; got 33"):
        int4_group(33, 64)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_linear_error_is_within_the_format_bound(scheme):
    config = SCHEMES[scheme]
    linear = torch.nn.Linear(128, 40, bias=True)
    x = torch.randn(3, 5, 128)
    q = QuantizedLinear(linear, config)
    # |x . (w_q - w)| <= sum_i |x_i| * step_i / 2, per output
    step = q.scale[:, None].expand(40, 128) if config.scheme == "int8" else q.scale.repeat_interleave(
        config.group_size, dim=-1)
    bound = x.abs() @ (step / 2).t()
    if config.scheme == "int4":  # the activations' rounding: |(x~ - x) . w_q| <= |x~ - x| . |w_q|
        bound += (quantize_activations(x, config.group_size) - x).abs() @ dequantize(q.value()).abs().t()
    with torch.no_grad():
        err = (q(x) - linear(x)).abs()
    assert (err <= bound + 1e-4).all() and err.max() > 0


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_activations_round_to_int8_per_block_of_the_bytes_a_kernel_reads(group):
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    x[1, 40:] = 0  # a block of zeros stays zero
    got = quantize_activations(x, group)
    H = group // 2
    for b in range(256 // 64):  # block b: the inputs of packed bytes 32b .. 32b + 31, two per byte (j and j + G/2)
        inputs = [p // H * group + p % H + half for p in range(32 * b, 32 * b + 32) for half in (0, H)]
        step = x[:, inputs].abs().amax(-1, keepdim=True) / 127
        levels = got[:, inputs] / step.clamp_min(1e-30)
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
        assert ((got[:, inputs] - x[:, inputs]).abs() <= step / 2 * (1 + 1e-6)).all()
    spike = x.clone()  # group 128: block 0 holds inputs 0-31 and 64-95, so a spike at input 64 coarsens those only
    spike[0, 64] = 1000.0
    changed = (quantize_activations(spike, 128) != quantize_activations(x, 128))[0].nonzero().flatten().tolist()
    assert set(changed) <= set(range(32)) | set(range(64, 96)) and 0 in changed


@needs_numba
@pytest.mark.parametrize("group", [32, 64, 128])
def test_numba_rounds_activations_in_place_as_the_spec_does(group):
    from smoe.kernels import numba_quant  # numba's fused experts round the down projection's input inside the JIT

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    x[1, 3], x[2, 200], x[3, 64:] = float("nan"), float("inf"), 0
    got = x.numpy().copy()
    numba_quant._round_activations(got, 0, 4, group)
    torch.testing.assert_close(torch.from_numpy(got), quantize_activations(x, group), rtol=0, atol=0, equal_nan=True)


def test_int4_weights_multiply_int8_activations_where_the_format_says():
    def weight(inputs, group):
        return quantize_weight(torch.randn(8, inputs), QuantConfig("int4", group))

    assert int8_activations(weight(128, 32)) and int8_activations(weight(192, 64))
    assert not int8_activations(weight(96, 64))  # groups of 48
    assert not int8_activations(weight(160, 32))  # 160 inputs: not whole blocks of 64
    assert not int8_activations(quantize_weight(torch.randn(8, 128), QuantConfig("int8")))
    w, x = weight(128, 64), torch.randn(2, 128)
    torch.testing.assert_close(kernels.quantized("reference", CPU).linear(x, w),
                               quantize_activations(x, 64) @ dequantize(w).t())


def _cpp_kernels():
    return kernels.quantized("cpp", CPU)  # a failed build fails here, naming its error


@pytest.fixture(params=params("quantized"))
def fast(request):
    """Every registered backend's kernels for quantised weights but the spec's (tests/backend_params.py says
    which skip)."""
    return kernels.quantized(request.param.name, CPU)


@of("cpp")
def test_cpp_int4_activations_carry_inf_and_nan_through_as_the_spec_does():
    w = quantize_weight(torch.randn(9, 128), QuantConfig("int4", 64))
    x = torch.randn(3, 128)
    x[0, 5], x[1, 100] = float("nan"), float("inf")
    got, want = _cpp_kernels().linear(x, w), kernels.quantized("reference", CPU).linear(x, w)
    assert torch.equal(got.isnan(), want.isnan()) and got[:2].isnan().all() and not got[2].isnan().any()


@of("cpp")
@pytest.mark.parametrize("group", [32, 64, 96, 128])
def test_cpp_rounds_int8_activations_bit_for_bit_as_the_spec_does(group):
    # One-hot weights (channel c reads input c with scale 1, offset 0) make each output one activation as the
    # kernel rounded it, times its block's scale: exactly the spec's value, ties and zero blocks included.
    inputs = 384 if group == 96 else 256
    q = torch.eye(inputs, dtype=torch.uint8).unflatten(-1, (-1, group))
    ones = torch.ones(inputs, inputs // group)
    w = QWeight(pack_int4(q), ones, torch.zeros_like(ones), group)
    x = torch.randn(4, inputs, generator=torch.Generator().manual_seed(2)) * 3
    x[1] = torch.arange(inputs) % 9 - 4.5  # halves to round to even where a block's max|x| is 127 ...
    x[1, ::64] = 127.0  # ... as this makes every block's where blocks are 64 consecutive inputs (G = 32, 64)
    x[2, 64:192] = 0  # zero blocks
    x[3, 7] = 1e-30  # a denormal step
    got = _cpp_kernels().linear(x, w)
    torch.testing.assert_close(got, quantize_activations(x, group), rtol=0, atol=0)


@of("cpp")
def test_cpp_int4_blocks_that_straddle_groups_match_the_reference():
    # 192 inputs at group 128 quantise in groups of 96: the second block of 64 starts in one group and ends in the next
    w = quantize_weight(torch.randn(9, 192), QuantConfig("int4", 128))
    assert w.group_size == 96 and int8_activations(w)
    x = torch.randn(5, 192)
    torch.testing.assert_close(_cpp_kernels().linear(x, w), kernels.quantized("reference", CPU).linear(x, w),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows,outputs,inputs", [(1, 64, 128), (3, 66, 128), (16, 7, 128), (5, 1, 128),
                                                 (6, 10, 36)])  # tile tails; 36: an int8 tail, int4 groups of 12
def test_fast_linear_matches_the_reference(fast, scheme, rows, outputs, inputs):
    g = torch.Generator().manual_seed(rows * outputs)
    w = quantize_weight(torch.randn(outputs, inputs, generator=g), SCHEMES[scheme])
    x = torch.randn(rows, inputs, generator=g)
    want = kernels.quantized("reference", CPU).linear(x, w)
    torch.testing.assert_close(fast.linear(x, w), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 1, 6, 2], [0, 0, 9, 0, 0], [0, 0, 0, 0, 0]])
def test_fast_experts_match_the_reference(fast, scheme, activation, counts):
    g = torch.Generator().manual_seed(sum(counts))
    E, D, F = 5, 64, 96
    gate_up = quantize_weight(torch.randn(E, 2 * F, D, generator=g) / 8, SCHEMES[scheme])
    down = quantize_weight(torch.randn(E, D, F, generator=g) / 8, SCHEMES[scheme])
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), D, generator=g)
    want = kernels.quantized("reference", CPU).experts(x, counts_E, gate_up, down, activation)
    got = fast.experts(x, counts_E, gate_up, down, activation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", params("quantized", where=lambda entry: entry.tokens is not None))
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tokens", [1, 6])
def test_fast_kernels_from_unsorted_tokens_match_the_reference(backend, scheme, tokens):
    fast = kernels.quantized(backend.name, CPU)  # numba has no tokens kernel: the layer sorts for it
    g = torch.Generator().manual_seed(tokens)
    E, K, D, F = 6, 3, 64, 48
    gate_up = quantize_weight(torch.randn(E, 2 * F, D, generator=g) / 8, SCHEMES[scheme])
    down = quantize_weight(torch.randn(E, D, F, generator=g) / 8, SCHEMES[scheme])
    x = torch.randn(tokens, D, generator=g)
    ids_NK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    ids_NK[0, 1] = -1  # padding's assignments route nowhere
    weights_NK = torch.rand(tokens, K, generator=g)
    reference = kernels.quantized("reference", CPU).tokens
    assignments = Assignments(ids_NK.flatten(), weights_NK.flatten())
    want = reference(x, assignments, gate_up, down, "silu")
    torch.testing.assert_close(fast.tokens(x, assignments, gate_up, down, "silu"), want, rtol=1e-4, atol=1e-4)
    # the spec itself, against the experts' seam on rows sorted by expert: token 0's kept choices
    kept = [int(e) for e in ids_NK[0] if e >= 0]
    by_expert = sorted(range(len(kept)), key=lambda j: kept[j])
    rows = kernels.quantized("reference", CPU).experts(
        x[:1].expand(len(kept), D), torch.bincount(torch.tensor(sorted(kept)), minlength=E), gate_up, down, "silu")
    weights_0 = weights_NK[0][ids_NK[0] >= 0]
    torch.testing.assert_close(want[0], sum(weights_0[j] * rows[i] for i, j in enumerate(by_expert)), rtol=1e-5,
                               atol=1e-5)


@of("cpp")  # what auto runs for quantised weights where it builds: the kernel that sorts the tokens itself
@pytest.mark.parametrize("preset", ["mixtral-tiny", "deepseek-v3-tiny"])
def test_inference_takes_the_kernels_moe_and_matches_the_layers_own_dispatch(preset):
    model = smoe.quantize(_model(preset, **({"layout.n_mtp_modules": 0} if "v3" in preset else {})), "int8")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: its tokens reach no expert on either path
    calls = []
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in moe_layers:
        layer.experts.register_forward_hook(lambda *args: calls.append(1))  # the seam: only the sorting path
    with torch.no_grad():
        direct = model(ids, attention_mask=mask, router_stats=False).logits
        assert not calls
        sorted_path = model(ids, attention_mask=mask).logits
        assert len(calls) == len(moe_layers)
    torch.testing.assert_close(direct, sorted_path, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4-g64"])
def test_fast_kernels_on_two_threads_match_the_reference(fast, scheme):
    # two threads and enough multiply-adds split the work (numba's parallel build, the C++ kernels' parallel_for)
    g = torch.Generator().manual_seed(3)
    w = quantize_weight(torch.randn(520, 512, generator=g), SCHEMES[scheme])
    gate_up = quantize_weight(torch.randn(3, 256, 512, generator=g) / 8, SCHEMES[scheme])
    down = quantize_weight(torch.randn(3, 512, 128, generator=g) / 8, SCHEMES[scheme])
    x, counts_E = torch.randn(6, 512, generator=g), torch.tensor([2, 0, 4])
    torch.set_num_threads(2)
    try:
        linear = fast.linear(x, w)
        experts = fast.experts(x, counts_E, gate_up, down, "silu")
    finally:
        torch.set_num_threads(1)
    reference = kernels.quantized("reference", CPU)
    torch.testing.assert_close(linear, reference.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(experts, reference.experts(x, counts_E, gate_up, down, "silu"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", params("quantized", where=lambda entry: entry.row_independent))
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("threads", [1, 2])
def test_row_independent_kernels_give_a_row_the_same_bits_whatever_rows_share_its_call(backend, scheme, threads):
    # row_independent: what lets the decode engine's request for row independence skip the fixed-shape tiles
    fast = kernels.quantized(backend.name, CPU)
    assert fast.row_independent
    g = torch.Generator().manual_seed(7)
    E, K, D, F = 8, 2, 128, 96  # 128 inputs: every tile shape (4, 3, 2 and 1 rows) meets every row below
    gate_up = quantize_weight(torch.randn(E, 2 * F, D, generator=g), SCHEMES[scheme])
    down = quantize_weight(torch.randn(E, D, F, generator=g), SCHEMES[scheme])
    w = quantize_weight(torch.randn(70, D, generator=g), SCHEMES[scheme])
    x = torch.randn(11, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(11)]).flatten()
    ids[4:8] = torch.tensor([3, 5, 3, 5])  # experts shared by several rows
    weights = torch.rand(11 * K, generator=g)
    torch.set_num_threads(threads)
    try:
        together = fast.tokens(x, Assignments(ids, weights), gate_up, down, "silu"), fast.linear(x, w)
        for n in range(11):
            one = Assignments(ids[n * K : (n + 1) * K], weights[n * K : (n + 1) * K])
            alone = fast.tokens(x[n : n + 1], one, gate_up, down, "silu"), fast.linear(x[n : n + 1], w)
            assert torch.equal(alone[0][0], together[0][n]) and torch.equal(alone[1][0], together[1][n])
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("backend", params("quantized", where=lambda entry: not entry.row_independent, spec=True))
@pytest.mark.parametrize("scheme", ["int8", "int4-g64"])
def test_kernels_in_fixed_shape_tiles_give_a_row_the_same_bits_whatever_rows_share_its_call(backend, scheme):
    # what row independence runs where the kernels do not keep it themselves
    tiled = kernels.quantized(kernels.BackendRequest(backend.name, row_independent=True), CPU)
    assert tiled.row_independent
    g = torch.Generator().manual_seed(8)
    E, D, F = 3, 64, 32
    gate_up = quantize_weight(torch.randn(E, 2 * F, D, generator=g), SCHEMES[scheme])
    down = quantize_weight(torch.randn(E, D, F, generator=g), SCHEMES[scheme])
    counts_E = torch.tensor([6, 0, 3])  # two tiles, the second partly padding; an idle expert; a tile of three
    x = torch.randn(9, D, generator=g)
    together = tiled.experts(x, counts_E, gate_up, down, "silu")
    for r, e in enumerate([0] * 6 + [2] * 3):
        alone = tiled.experts(x[r : r + 1], torch.eye(E, dtype=torch.int64)[e], gate_up, down, "silu")
        assert torch.equal(alone[0], together[r])


@of("cpp")
@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_cpp_ops_pass_torch_opcheck(scheme):
    # schema, fake (shape) kernels and dispatch as torch.compile and fake tensors see them
    _cpp_kernels()
    g = torch.Generator().manual_seed(5)
    w = quantize_weight(torch.randn(12, 64, generator=g), SCHEMES[scheme])
    gate_up = quantize_weight(torch.randn(3, 32, 64, generator=g), SCHEMES[scheme])
    down = quantize_weight(torch.randn(3, 64, 16, generator=g), SCHEMES[scheme])
    x, group = torch.randn(4, 64, generator=g), w.group_size or 0
    stacks = (gate_up.qweight, gate_up.scale, gate_up.offset, group, down.qweight, down.scale, down.offset,
              down.group_size or 0, False)
    torch.library.opcheck(torch.ops.smoe_quant.linear, (x, w.qweight, w.scale, w.offset, group))
    torch.library.opcheck(torch.ops.smoe_quant.experts, (x, torch.tensor([0, 1, 1, 4]), *stacks))
    torch.library.opcheck(torch.ops.smoe_quant.moe, (x, torch.tensor([0, 2, 1, 0, 2, 1, -1, 0]),
                                                     torch.rand(8, generator=g), *stacks))


@of("cpp")
def test_cpp_kernels_refuse_malformed_weights():
    _cpp_kernels()
    w = quantize_weight(torch.randn(8, 64), SCHEMES["int8"])
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        cpp_quant.linear(torch.randn(2, 32), w)
    with pytest.raises(RuntimeError, match="int8 weights are int8"):
        cpp_quant.linear(torch.randn(2, 64), w._replace(qweight=w.qweight.view(torch.uint8)))
    with pytest.raises(RuntimeError, match="offs must run from 0 to the row count"):
        stack = quantize_weight(torch.randn(2, 8, 64), SCHEMES["int8"])
        torch.ops.smoe_quant.experts(torch.randn(3, 64), torch.tensor([0, 1, 2]), stack.qweight, stack.scale, None,
                                     0, stack.qweight, stack.scale, None, 0, False)


@pytest.mark.parametrize("numba", [pytest.param(True, marks=needs_numba), False])
def test_without_the_cpp_kernels_auto_falls_back_with_a_warning_and_the_same_model(monkeypatch, numba):
    model = smoe.quantize(_model(), "int8")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids).logits
        for ops in (cpp_quant, cpp_experts):  # one library holds both: a build fails for both
            monkeypatch.setattr(ops, "build", lambda: "RuntimeError: no C++ compiler (a test's stand-in)")
        monkeypatch.setattr(kernels, "HAS_NUMBA", numba)
        fallback = "numba" if numba else "reference"
        with pytest.warns(UserWarning, match=f"could not be built .*no C\\+\\+ compiler.*running the {fallback}"):
            assert kernels.quantized("auto", CPU) is kernels.quantized(fallback, CPU)
        with pytest.raises(ValueError, match="'cpp' kernels could not be built here"):
            kernels.quantized("cpp", CPU)
        assert ("numba" in kernels.quantized_names()) == numba
        torch.testing.assert_close(model(ids).logits, fast, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme,bound", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_stay_close_to_full_precision(scheme, bound):
    # A dense model, so no routing decision can flip; each matmul's error is bounded by half a step per weight
    # (1/254 of a row's largest weight for int8, 1/30 of a group's range for int4), and over two blocks the
    # logits move by a few times that, relative to their size.
    model = _model(moe=None)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        quantized = smoe.quantize(model, scheme)(ids).logits
    assert 0 < (quantized - full).norm() / full.norm() < bound


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantised_checkpoint_loads_with_the_same_logits(scheme, tmp_path):
    model = smoe.quantize(_model("deepseek-v3-tiny", **{"layout.n_mtp_modules": 0}), scheme)
    save_model_checkpoint(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization"]["scheme"] == scheme
    loaded = smoe.load_pretrained(tmp_path / "q")
    assert loaded.config == model.config
    assert loaded.layers[1].ffn.experts.w_gate_up.qweight.dtype == model.layers[1].ffn.experts.w_gate_up.qweight.dtype
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("preset", ["mixtral-tiny", "deepseek-v3-tiny"])  # KV cache, MLA latent cache
def test_quantised_greedy_generation_matches_the_full_forward(preset):
    model = smoe.quantize(_model(preset, **{"layout.n_mtp_modules": 0}), "int8")
    prompts = [[5, 6, 7, 8], [9, 10]]  # the second left-padded
    new = smoe.generate(model, prompts, max_new_tokens=5)
    with torch.no_grad():
        for prompt, row in zip(prompts, new.tolist(), strict=True):
            # teacher-forced without a cache: each generated token is the argmax after the tokens before it
            logits = model(torch.tensor([prompt + row[:-1]])).logits[0, len(prompt) - 1 :]
            assert logits.argmax(-1).tolist() == row


def test_bad_schemes_and_group_sizes_are_refused():
    with pytest.raises(ValueError, match="quantization.scheme: must be of type 'int8' | 'int4', got 'int3'"):
        smoe.quantize(_model(), "int3")
    with pytest.raises(ValueError, match="quantization.group_size: int4 needs one of 32, 64, 128, got 48"):
        smoe.quantize(_model(), "int4", 48)
    with pytest.raises(ValueError, match="quantization.group_size: int8 has one scale per output channel"):
        smoe.quantize(_model(), "int8", 64)
    with pytest.raises(ValueError, match=r"even number of inputs; got 33 \(head\)"):
        smoe.quantize(_model(**{"attention.head_dim": 8, "dim": 33, "attention.n_heads": 4}), "int4")
    model = smoe.quantize(_model(), "int8")
    assert smoe.quantize(model, "int8") is model
    with pytest.raises(ValueError, match="already quantised"):
        smoe.quantize(model, "int4")


def test_a_backward_through_quantised_weights_is_refused():
    model = smoe.quantize(_model(), "int8").train()
    ids = torch.randint(0, 256, (1, 8))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    with pytest.raises(RuntimeError, match="inference only"):
        out.loss.backward()


def test_loading_into_a_mismatched_config_is_refused(tmp_path):
    save_model_checkpoint(smoe.quantize(_model(), "int8"), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    refusals = {None: "holds int8 quantised weights, but the config.json beside it has no quantization entry",
                "int4": "holds int8 quantised weights, but the config.json beside it says quantization int4"}
    for scheme, message in refusals.items():
        quantization = scheme and {"scheme": scheme, "group_size": 64}
        (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "quantization": quantization}))
        (tmp_path / "q" / "manifest.json").unlink(missing_ok=True)
        with pytest.raises(ValueError, match=message):
            smoe.load_pretrained(tmp_path / "q")
    save_model_checkpoint(_model(), tmp_path / "full")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    (tmp_path / "full" / "config.json").write_text(json.dumps({**config, "quantization": {"scheme": "int8"}}))
    with pytest.raises(ValueError, match="holds full-precision weights, but the config.json beside it says "
                                         "quantization int8"):
        smoe.load_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="quantization: a int8 model is stored in smoe's own format"):
        smoe.save_pretrained(smoe.quantize(_model(), "int8"), tmp_path / "hf")


def test_cli_converts_to_int4_and_generates_from_it(tmp_path, capsys):
    save_model_checkpoint(_model(), tmp_path / "full")
    assert main(["convert", str(tmp_path / "full"), "--quantize", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    assert "smoe int4 format" in capsys.readouterr().out
    argv = ["--prompt-ids", "5,6,7", "--max-new-tokens", "4"]
    assert main(["generate", str(tmp_path / "q"), *argv]) == 0
    from_file = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "full"), "--quantize", "int4", "--group-size", "32", *argv]) == 0
    assert capsys.readouterr().out == from_file
    assert main(["generate", str(tmp_path / "full"), "--quantize", "int8", "--group-size", "32", *argv]) == 2
    assert "--group-size: only with --quantize int4" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "full"), "--to", "hf", "--quantize", "int8", "--out",
                 str(tmp_path / "hf")]) == 2
    assert "--quantize: only with --to smoe" in capsys.readouterr().err
