import shutil
import warnings

import numpy as np
import pytest
import torch

import smoe
from smoe import kernels, presets
from smoe.cli import main
from smoe.config import RopeScaling
from smoe.generation import Engine, Request, TextStream, generate_stream, pad_left, sample
from smoe.kernels import cpp_experts, cpp_quant
from smoe.models import build_model

YARN = RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16, mscale=1.0, mscale_all_dim=1.0)

# Every attention variant the decode path has to reproduce: GQA with and without a sliding window and qk-norm
# (per head, over all heads), MLA with and without query compression, with YaRN.
CACHE_CASES = {
    "gqa": ("mixtral-tiny", {}),
    "gqa-window": ("mixtral-tiny", {"attention.sliding_window": 6}),
    "gqa-head-qk-norm": ("qwen3-moe-tiny", {}),
    "gqa-full-qk-norm-clip": ("olmoe-tiny", {"attention.clip_qkv": 0.5}),
    "mla-q-lora-yarn": ("deepseek-v3-tiny", {"layout.n_mtp_modules": 0, "attention.rope_scaling": YARN}),
    "mla-yarn": ("deepseek-v2-tiny", {"attention.q_lora_rank": None, "attention.rope_scaling": YARN}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset, **changes):
    torch.manual_seed(0)
    return build_model(presets.get(preset, **{"n_layers": 2, **changes})).eval()


@pytest.mark.parametrize("case", CACHE_CASES)
def test_prefill_chunk_and_decode_steps_match_one_forward(case):
    preset, changes = CACHE_CASES[case]
    model = _model(preset, **changes)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 20)
        # a prefill, a multi-token chunk on top of the cache (MLA: absorbed with T > 1), then single steps
        parts = [model(ids[:, :9], cache=cache).logits, model(ids[:, 9:12], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CACHE_CASES)
def test_a_row_decodes_bit_for_bit_the_same_whatever_the_other_rows_hold(case):
    # The engine's guarantee: a decode forward always has the same rows; row 1 runs one sequence while its
    # neighbours are padding (free rows) in one run and other sequences, at other lengths, in the other.
    preset, changes = CACHE_CASES[case]
    model = _model(preset, **changes)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size

    def run(neighbours: bool) -> torch.Tensor:
        cache = model.new_cache(4, 32)
        with torch.no_grad():
            model(torch.arange(3, 10)[None], cache=cache.rows(1, 2))
            if neighbours:
                for row, n in ((0, 11), (3, 3)):
                    model(torch.randint(0, V, (1, n), generator=g), cache=cache.rows(row, row + 1))
            logits, token = [], 5
            for _ in range(6):
                ids = torch.randint(0, V, (4, 1), generator=g)
                ids[1] = token
                real = torch.tensor([[neighbours], [True], [False], [neighbours]])
                step = model(ids, attention_mask=real, cache=cache, logits_to_keep=1, router_stats=False,
                             expert_backend=kernels.ROW_INDEPENDENT).logits[1, -1]
                logits.append(step)
                token = int(step.argmax())
        return torch.stack(logits)

    assert torch.equal(run(neighbours=True), run(neighbours=False))


@pytest.mark.parametrize("preset, changes", [("mixtral-tiny", {"attention.sliding_window": 5}),
                                             ("deepseek-v3-tiny", {})])
def test_batched_decode_steps_attend_as_a_call_per_row_does(preset, changes):
    # independent_rows=False: one attention call over every row, each masked to its own keys; rows of different
    # lengths, one row padding this step
    model = _model(preset, **changes)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (9, 3, 6)]
    steps = torch.randint(0, V, (4, 3, 1), generator=g)
    logits = {}
    with torch.no_grad():
        for independent in (True, False):
            cache = model.new_cache(3, 16, independent_rows=independent)
            for row, prompt in enumerate(prompts):
                model(prompt, cache=cache.rows(row, row + 1))
            real = torch.tensor([[True], [False], [True]])
            logits[independent] = [model(ids, attention_mask=real, cache=cache, router_stats=False).logits
                                   for ids in steps]
    for per_row, at_once in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(at_once[[0, 2]], per_row[[0, 2]], rtol=1e-5, atol=1e-5)


HYBRID = {"layout.layer_types": ("linear_attention", "full_attention")}  # a recurrent state and a KV cache


@pytest.mark.parametrize("case", [*CACHE_CASES, "hybrid"])
def test_the_static_shape_decode_step_computes_what_the_per_row_path_does(case):
    # Transformer.decode_step, eager: rows of different lengths, one row padding for a few steps; the padding
    # row's stray key must not reach its later real tokens, nor its token the row's recurrent state.
    preset, changes = CACHE_CASES[case] if case != "hybrid" else ("qwen3-next-tiny", HYBRID)
    model = _model(preset, **changes)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (9, 3, 6)]
    steps = torch.randint(0, V, (5, 3, 1), generator=g)
    real_B1 = torch.tensor([[True], [False], [True]])
    caches, logits = [model.new_cache(3, 24) for _ in range(2)], {}
    with torch.no_grad():
        for static, cache in zip((False, True), caches, strict=True):
            for row, prompt in enumerate(prompts):
                model(prompt, cache=cache.rows(row, row + 1))
            logits[static] = []
            for t, ids in enumerate(steps):
                real = real_B1 if t < 3 else torch.ones_like(real_B1)  # row 1 joins the later steps
                if static:
                    out, loads = model.decode_step(ids, cache.lengths_B.clone(), cache.layers, real)
                    assert loads == {}  # not asked for
                    cache.lengths_B += real[:, 0]
                else:
                    out = model(ids, attention_mask=real, cache=cache, router_stats=False).logits[:, -1]
                logits[static].append(out[real[:, 0]])
    for per_row, static in zip(logits[False], logits[True], strict=True):
        torch.testing.assert_close(static, per_row, rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0].lengths_B, caches[1].lengths_B)


@pytest.mark.slow
@pytest.mark.parametrize("preset, changes, quantize", [("mixtral-tiny", {}, None), ("deepseek-v3-tiny", {}, "int8"),
                                                      ("qwen3-next-tiny", HYBRID, None)])
def test_compiled_decode_steps_give_the_eager_tokens(preset, changes, quantize):
    # One graph per step, for every cache length; prompts of different lengths, and a stop token that turns one
    # row into padding early.
    model = _model(preset, **changes)
    if quantize:
        smoe.quantize(model, quantize)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (7, 2, 11)]
    eager = smoe.generate(model, prompts, max_new_tokens=10)
    stop = [int(eager[1, 3])]
    eager = smoe.generate(model, prompts, max_new_tokens=10, stop_tokens=stop)
    assert torch.equal(smoe.generate(model, prompts, max_new_tokens=10, stop_tokens=stop, compile=True), eager)
    longer = [p * 2 for p in prompts]  # in a new engine with a longer cache: the same graph, no recompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = smoe.generate(model, longer, max_new_tokens=6, compile=True)
    assert torch.equal(compiled, smoe.generate(model, longer, max_new_tokens=6))


@pytest.mark.parametrize("kw, message", [({"decode_rows": 2}, "decode_rows"), ({}, "C\\+\\+ compiler")])
def test_what_a_compiled_decode_cannot_run_is_refused_naming_compile(kw, message, monkeypatch):
    if "compiler" in message:
        def none_found():
            raise RuntimeError("no C++ compiler among ('g++',)")
        monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", none_found)
    model = _model("mixtral-tiny")
    with pytest.raises(ValueError, match=f"compile: .*{message}"):
        smoe.generate(model, [[1, 2]], max_new_tokens=2, compile=True, **kw)


@pytest.mark.slow
def test_a_compiled_engine_of_dependent_rows_runs_the_fewest_rows_and_slots_that_hold_its_requests():
    model = _model("mixtral-tiny")
    engine = Engine(model, rows=5, max_len=150, compile=True, independent_rows=False)
    assert engine.row_buckets == [1, 2, 4, 5]
    engine.warm_up()  # compiles each bucket: one graph each, for every slot count
    g = torch.Generator().manual_seed(8)
    requests = [Request(torch.randint(0, 500, (n,), generator=g).tolist(), max_new_tokens=m)
                for n, m in [(3, 9), (70, 12), (5, 3), (100, 6), (9, 4), (2, 7)]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run_engine(engine, requests)
    for request in requests:  # the eager step's tokens (logits may move in the last bits)
        alone = smoe.generate(model, [request.prompt], max_new_tokens=request.max_new_tokens)
        assert request.tokens == alone[0].tolist()


def _run_engine(engine: Engine, requests: list[Request]) -> Engine:
    """As the server runs it: newcomers join free rows between decode steps."""
    waiting = list(requests)
    with torch.inference_mode():
        while waiting or engine.running:
            while waiting and engine.free_rows:
                engine.add(waiting.pop(0))
            if engine.prefilling:
                engine.prefill()
            engine.decode()
    return engine


@pytest.mark.slow
def test_a_compiled_engine_keeps_rows_independent_with_quantised_experts_and_counts_them():
    # Alone or among others, a request's logits must not move by a bit: the engine's one fixed shape.
    model = smoe.quantize(_model("deepseek-v3-tiny"), "int8")
    if not all(layer.experts.rows_independent(torch.device("cpu")) for layer in model.moe_layers):
        pytest.skip("the C++ kernels could not be built here")

    def requests() -> list[Request]:
        g = torch.Generator().manual_seed(3)
        return [Request(torch.randint(0, 500, (n,), generator=g).tolist(), max_new_tokens=m, logprobs=2, **sampling)
                for n, m, sampling in [(9, 6, {}), (70, 9, {"temperature": 1.0, "seed": 4}), (14, 3, {}), (5, 7, {}),
                                       (1, 5, {"temperature": 0.7, "top_p": 0.9, "seed": 1}), (130, 4, {})]]

    def engine(compile=True):
        engine = Engine(model, rows=4, max_len=140, compile=compile, count_experts=True)
        engine.warm_up()  # compiles every bucket, as the server does before it listens
        return engine

    together = requests()
    compiled = _run_engine(engine(), together)
    assert compiled.row_buckets == [4]
    eager = _run_engine(engine(compile=False), requests())
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph
        for request, alone in zip(together, requests(), strict=True):
            _run_engine(engine(), [alone])
            assert request.tokens == alone.tokens and request.finish_reason == "length"
            assert request.token_logprobs == alone.token_logprobs  # bit for bit
    assert compiled.expert_tokens.keys() == eager.expert_tokens.keys() == {1}
    assert torch.equal(compiled.expert_tokens[1], eager.expert_tokens[1])


@pytest.mark.parametrize("quantize", [None, "int8", "int8 without the C++ kernels"])
@pytest.mark.filterwarnings("ignore:quantization. the C\\+\\+ kernels could not be built")
def test_engine_requests_joining_and_leaving_get_what_each_gets_alone(quantize, monkeypatch):
    model = _model("deepseek-v3-tiny")
    if quantize:  # quantised experts keep the promise: the C++ kernels by themselves, others in fixed-shape tiles
        if quantize.endswith("without the C++ kernels"):
            for ops in (cpp_quant, cpp_experts):  # one library holds both: a build fails for both
                monkeypatch.setattr(ops, "build", lambda: "RuntimeError: a test's stand-in")
            assert not kernels.quantized("auto", torch.device("cpu")).row_independent
        smoe.quantize(model, "int8")
    g = torch.Generator().manual_seed(3)
    requests = [Request(torch.randint(0, 500, (n,), generator=g).tolist(), max_new_tokens=m, **sampling)
                for n, m, sampling in [(9, 6, {}), (2, 9, {}), (14, 3, {}), (5, 7, {"temperature": 1.0, "seed": 4}),
                                       (1, 5, {}), (7, 8, {"temperature": 0.7, "top_p": 0.9, "seed": 1}),
                                       (11, 4, {})]]
    engine = Engine(model, rows=3, max_len=24)
    waiting = list(requests)
    with torch.inference_mode():
        while waiting or engine.running:  # as the server runs it: newcomers join between decode steps
            while waiting and engine.free_rows:
                engine.add(waiting.pop(0))
            if engine.prefilling:
                engine.prefill()
            engine.decode()
    for r in requests:
        alone = smoe.generate(model, [r.prompt], max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                              top_p=r.top_p, seed=r.seed, decode_rows=3)
        assert r.tokens == alone[0].tolist() and r.finish_reason == "length"


def test_padding_reaches_no_expert_and_the_load_counts_real_tokens():
    model = _model("mixtral-tiny")
    ids, real = pad_left([[5, 6, 7, 8], [3]], pad_id=0)
    with torch.no_grad():
        full = model(ids, attention_mask=real)
        load = model(ids, attention_mask=real, router_stats="load", logits_to_keep=1)
    top_k = model.config.moe.top_k
    for layer, stats in load.router_stats.items():
        assert int(stats.load.sum()) == 5 * top_k and stats.aux_loss is None
        assert torch.equal(stats.load, full.router_stats[layer].load)
    assert load.aux_loss == 0


def test_inference_mode_keeps_the_last_logits_and_skips_router_statistics():
    model = _model("deepseek-v3-tiny", **{"layout.n_mtp_modules": 0})
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        lean = model(ids, logits_to_keep=3, router_stats=False)
    assert full.router_stats and lean.router_stats == {}
    assert lean.logits.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(lean.logits, full.logits[:, -3:], rtol=1e-5, atol=1e-6)
    for bad, labels in ((-1, None), (2, ids)):
        with pytest.raises(ValueError, match="^logits_to_keep: "):
            model(ids, labels=labels, logits_to_keep=bad)


@pytest.mark.parametrize("preset", ["mixtral-tiny", "deepseek-v3-tiny"])
def test_a_left_padded_row_generates_what_its_prompt_alone_does(preset):
    model = _model(preset, **{"attention.sliding_window": 4} if preset == "mixtral-tiny" else {})
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100]]
    batched = smoe.generate(model, prompts, max_new_tokens=8)
    for row, prompt in zip(batched, prompts, strict=True):
        assert torch.equal(row, smoe.generate(model, [prompt], max_new_tokens=8)[0])


def test_padded_forward_matches_each_row_unpadded():
    model = _model("deepseek-v2-tiny")
    ids, mask = pad_left([[5, 6, 7, 8, 9], [3, 4]], pad_id=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(padded[1, 3:], model(ids[1:, 3:]).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded[0], model(ids[:1]).logits[0], rtol=1e-4, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    model = _model("mixtral-tiny")
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    first = smoe.generate(model, [[1, 2, 3]], seed=7, **kw)
    assert torch.equal(first, smoe.generate(model, [[1, 2, 3]], seed=7, **kw))
    assert not torch.equal(first, smoe.generate(model, [[1, 2, 3]], seed=8, **kw))


def test_top_k_1_sampling_is_greedy():
    model = _model("deepseek-v3-tiny")
    greedy = smoe.generate(model, [[1, 2, 3], [4]], max_new_tokens=10)
    assert torch.equal(smoe.generate(model, [[1, 2, 3], [4]], max_new_tokens=10, temperature=1.5, top_k=1, seed=0),
                       greedy)


def test_top_p_samples_only_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample(logits, 1.0, top_k=3, generator=g).tolist()) == {0, 1, 2}


def test_a_temperature_below_the_threshold_is_greedy_and_a_top_p_rounding_to_0_is_refused():
    model = _model("mixtral-tiny")
    greedy = smoe.generate(model, [[1, 2, 3]], max_new_tokens=6)
    for temperature in (1e-40, 1e-6):  # logits / 1e-40 overflow to inf, whose softmax is NaN
        assert torch.equal(smoe.generate(model, [[1, 2, 3]], max_new_tokens=6, temperature=temperature), greedy)
    with pytest.raises(ValueError, match="^top_p: 1e-46 rounds to 0 in float32"):
        smoe.generate(model, [[1, 2, 3]], max_new_tokens=2, temperature=1.0, top_p=1e-46)


def test_a_row_whose_sampling_fails_ends_alone_and_the_others_go_on(monkeypatch):
    model = _model("mixtral-tiny")
    real_sample = sample

    def failing(logits_BV, temperature, top_k=None, top_p=None, generator=None):
        if temperature == 0.5:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_sample(logits_BV, temperature, top_k, top_p, generator)

    monkeypatch.setattr("smoe.generation.engine.sample", failing)
    bad = Request([4, 5], max_new_tokens=6, temperature=0.5, seed=1)
    good = [Request([1, 2, 3], max_new_tokens=6), Request([7], max_new_tokens=6, temperature=1.0, seed=2)]
    engine = Engine(model, rows=3, max_len=16)
    with torch.inference_mode():
        for request in (good[0], bad, good[1]):
            engine.add(request)
        while engine.prefilling:
            engine.prefill()
        while engine.running:
            engine.decode()
    assert bad.finish_reason == "error" and "sampling failed" in bad.error and bad.tokens == []
    for r in good:
        alone = smoe.generate(model, [r.prompt], max_new_tokens=6, temperature=r.temperature, seed=r.seed,
                              decode_rows=3)
        assert r.finish_reason == "length" and r.tokens == alone[0].tolist()
    with pytest.raises(RuntimeError, match="^row 0: sampling failed"):  # offline, the failure is the caller's
        smoe.generate(model, [[1, 2], [4, 5]], max_new_tokens=4, temperature=0.5)


def test_the_engine_records_the_log_probabilities_the_model_gives_prompt_and_new_tokens():
    model = _model("deepseek-v3-tiny")
    prompt = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(6)).tolist()
    scored = Request(prompt, max_new_tokens=0, logprobs=3, prompt_logprobs=True)
    sampled = Request(prompt, max_new_tokens=5, temperature=1.0, seed=3, logprobs=2, prompt_logprobs=True)
    engine = Engine(model, rows=2, max_len=16, prefill_chunk=4)  # the prompt's logits come in three chunks
    with torch.inference_mode():
        for request in (scored, sampled):
            engine.add(request)
        while engine.prefilling:
            engine.prefill()
        while engine.running:
            engine.decode()
        every = model(torch.tensor([prompt + sampled.tokens])).logits[0].log_softmax(-1)
    assert scored.finish_reason == "length" and scored.tokens == [] and scored.token_logprobs == []
    sequence = prompt + sampled.tokens
    for request in (scored, sampled):
        assert len(request.prompt_token_logprobs) == len(prompt) - 1  # the first token has none
        for t, entry in enumerate(request.prompt_token_logprobs + request.token_logprobs):
            assert entry.logprob == pytest.approx(every[t, sequence[t + 1]].item(), abs=1e-4)
            top = every[t].topk(request.logprobs)
            assert [i for i, _ in entry.top] == top.indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert len(sampled.token_logprobs) == 5
    with pytest.raises(ValueError, match="^max_new_tokens: 0 only when scoring the prompt"):
        engine.add(Request(prompt, max_new_tokens=0))


def test_a_stop_token_ends_its_row_with_padding_and_the_loop_when_all_stopped():
    model = _model("mixtral-tiny")
    free = smoe.generate(model, [[1, 2, 3], [9, 8]], max_new_tokens=10)
    stop = int(free[0, 3])
    assert stop not in free[0, :3].tolist()
    out = smoe.generate(model, [[1, 2, 3], [9, 8]], max_new_tokens=10, stop_tokens={stop}, pad_id=0)
    assert out[0, :4].tolist() == free[0, :4].tolist() and set(out[0, 4:].tolist()) <= {0}
    row1 = free[1].tolist()
    end = row1.index(stop) + 1 if stop in row1 else 10
    assert out[1, :end].tolist() == row1[:end]
    alone = smoe.generate(model, [[1, 2, 3]], max_new_tokens=10, stop_tokens={stop})
    assert alone[0].tolist() == free[0, :4].tolist()  # the loop ended at the stop token


def test_stream_yields_the_tokens_generate_returns():
    model = _model("qwen2-moe-tiny")
    steps = list(generate_stream(model, [[1, 2], [3, 4, 5]], max_new_tokens=5))
    assert torch.equal(torch.stack(steps, 1), smoe.generate(model, [[1, 2], [3, 4, 5]], max_new_tokens=5))


def test_expert_choice_routing_is_refused_naming_the_field():
    model = _model("mixtral-tiny", **{"moe.routing": "expert_choice", "moe.balance": "none"})
    with pytest.raises(ValueError, match="moe.routing"):
        smoe.generate(model, [[1, 2]], max_new_tokens=2)


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"max_new_tokens": 5000}, "max_new_tokens"), ({"prompts": [[1], []]}, "prompts: row 1"),
    ({"prompts": [[1, 10**6]]}, "prompts: token ids"),
])
def test_bad_arguments_name_the_argument(kw, field):
    model = _model("mixtral-tiny")
    args = {"prompts": [[1, 2]], "max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=field):
        smoe.generate(model, args.pop("prompts"), **args)


def test_labels_with_a_cache_are_refused():
    model = _model("mixtral-tiny")
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids, cache=model.new_cache(1, 4))


def test_text_stream_never_prints_a_partial_character():
    from smoe.train.data import train_tokenizer

    tokenizer = train_tokenizer(["once upon a time a fox"] * 20, vocab_size=300)
    text = "a fox 🦊 said héllo"
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(len(ids)))  # the case exists
    stream = TextStream(tokenizer)
    deltas = [stream.push([i]) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


# --- greedy parity with transformers' generate -------------------------------------------------------------------

@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v2-q_lora",
                                  "deepseek_v3"])
def test_greedy_matches_transformers_generate_on_a_left_padded_batch(case, tmp_path):
    pytest.importorskip("transformers")
    from test_hf_interop import _hf_model  # the tiny transformers model of each family, saved and converted

    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    ours = smoe.load_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, ours.config.vocab_size, (n,), generator=g).tolist() for n in (9, 5)]
    ids, mask = pad_left(prompts, pad_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no EOS: both sides run the full length
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[:, ids.shape[1]:]
    assert expected.shape == (2, 16)
    assert torch.equal(smoe.generate(ours, prompts, max_new_tokens=16, pad_id=0), expected)


# --- smoe generate ---------------------------------------------------------------------------------------------------

TINY = {"dim": 32, "n_layers": 2, "ffn_dim": 64, "vocab_size": 300, "moe.expert_dim": 32, "attention.n_heads": 4,
        "attention.n_kv_heads": 2, "max_seq_len": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from smoe.train import train_model

    root = tmp_path_factory.mktemp("generate")
    rng = np.random.default_rng(0)
    words = "once upon a time a little fox found a red ball and played with it in the sun all day".split()
    corpus = root / "corpus.txt"
    corpus.write_text("<|endoftext|>".join(" ".join(rng.choice(words, 80)) for _ in range(60)))
    result = train_model("mixtral-tiny", out=root / "run", data=str(corpus), overrides=TINY, steps=3, batch_size=4,
                         seq_len=32, eval_batches=1, precision="fp32", cache_dir=root / "cache", progress=False)
    return result.checkpoint


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_cli_generate_streams_the_greedy_continuation_of_a_trained_run(trained, flags, capsys):
    from smoe.generation import default_stop_tokens
    from smoe.io.checkpoint import load_model
    from smoe.io.tokenizer import find_tokenizer as load_tokenizer

    assert main(["generate", str(trained.parent.parent), "--prompt", "once upon", "--max-new-tokens", "8",
                 *flags]) == 0
    out = capsys.readouterr().out
    tokenizer = load_tokenizer(trained)
    model, _ = load_model(trained)
    new = smoe.generate(model, [tokenizer.encode("once upon").ids], max_new_tokens=8,
                        stop_tokens=default_stop_tokens(trained, tokenizer))
    assert out == "once upon" + tokenizer.decode(new[0].tolist()) + "\n"


def test_cli_generates_the_same_from_the_run_exported_to_hugging_face(trained, tmp_path, capsys):
    from smoe.interop.hf import read_tokenizer_json

    smoe.save_pretrained(smoe.load_pretrained(trained), tmp_path / "hf", model_type="mixtral",
                         tokenizer_json=read_tokenizer_json(trained))
    argv = ["--prompt", "a fox", "--prompt", "the sun", "--max-new-tokens", "8"]
    assert main(["generate", str(trained), *argv]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf"), *argv]) == 0
    assert capsys.readouterr().out == from_run and from_run.startswith("[0] a fox")


def test_cli_without_a_tokenizer_takes_ids_and_refuses_text(trained, tmp_path, capsys):
    bare = tmp_path / "bare"  # a model checkpoint saved without a tokenizer
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(trained / name, bare / name)
    assert main(["generate", str(bare), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    assert 1 <= len(printed) <= 4 and all(0 <= t < TINY["vocab_size"] for t in printed)
    assert main(["generate", str(bare), "--prompt", "once upon"]) == 2
    err = capsys.readouterr().err
    assert str(bare / "tokenizer.json") in err and "--prompt-ids" in err and "\n" not in err.strip()


def test_cli_sampling_with_a_seed_repeats(trained, capsys):
    argv = ["generate", str(trained), "--prompt-ids", "5,6", "--prompt-ids", "7", "--temperature", "1",
            "--top-k", "50", "--seed", "3", "--max-new-tokens", "6"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("[0] ") and "\n[1] " in first


@pytest.mark.parametrize("argv, message", [
    (["generate", "no/such/run", "--prompt-ids", "1"], "no/such/run"),
    (["generate", "no/such/run"], "--prompt TEXT or --prompt-ids"),
    (["generate", "no/such/run", "--prompt-ids", "1,x"], "--prompt-ids '1,x'"),
    (["generate", "no/such/run", "--prompt-ids", "1", "--top-p", "2"], "top_p: must be in (0, 1]"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
