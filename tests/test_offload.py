"""Routed experts on disk behind a budget (smoe.offload): the tokens of the in-memory model bit for bit, whatever the
budget, format, family layout and backend; the cache's bookkeeping; the errors; peak memory in a child process."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import smoe
from smoe import kernels, presets
from smoe.cli import main
from smoe.interop.hf import load_pretrained, save_model_checkpoint, save_pretrained
from smoe.io.safetensors import SafetensorsFile
from smoe.models import build_model
from smoe.offload.budget import OffloadConfig, expert_bytes, parse_size, plan
from smoe.offload.cache import _Priorities
from smoe.offload.experts import OffloadedExperts, cache_of

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13]]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset: str, quantize: str | None = None, **changes):
    torch.manual_seed(0)
    model = build_model(presets.get(preset, **{"n_layers": 3, **changes})).eval()
    return smoe.quantize(model, quantize) if quantize else model


def _stored_expert_bytes(model) -> int:
    """One expert's bytes in ``model``'s own tensors (its MoE layers' experts stack E of them)."""
    experts = model.moe_layers[0].experts
    tensors = list(experts.state_dict().values())
    return sum(t[0].numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, expert bytes as loaded): a smoe checkpoint in fp32, int8, int4, and Hugging Face
    directories in bf16 (Mixtral's per-expert tensors, DBRX's fused and transposed ones, DeepSeek-V3's with MTP)."""
    root = tmp_path_factory.mktemp("offload")
    made = {}
    for name, preset, quantize in [("fp32", "mixtral-tiny", None), ("int8", "deepseek-v3-tiny", "int8"),
                                   ("int4", "qwen3-moe-tiny", "int4")]:
        model = _model(preset, quantize)
        made[name] = (save_model_checkpoint(model, root / name), _stored_expert_bytes(model))
    for name, preset, model_type in [("hf-mixtral", "mixtral-tiny", "mixtral"), ("hf-dbrx", "dbrx-tiny", "dbrx"),
                                     ("hf-deepseek", "deepseek-v3-tiny", "deepseek_v3")]:
        model = _model(preset).to(torch.bfloat16)
        made[name] = (save_pretrained(model, root / name, model_type=model_type), _stored_expert_bytes(model))
    return made


def _tokens(model, decode_rows=None, backend=None):
    if backend is not None:
        model.set_expert_backend(backend)
    return smoe.generate(model, PROMPTS, max_new_tokens=6, decode_rows=decode_rows)


# --- tokens ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp32", "int8", "int4", "hf-mixtral", "hf-dbrx", "hf-deepseek"])
@pytest.mark.parametrize("slots", ["minimum", "a third", "all"])
def test_offloaded_experts_give_the_in_memory_tokens_bit_for_bit(checkpoints, name, slots):
    # "minimum": one layer's top_k experts, so a prompt's layer runs in waves; "all": every expert fits.
    path, one = checkpoints[name]
    ref = load_pretrained(path)
    n = sum(m.config.n_routed_experts for m in ref.moe_layers)
    count = {"minimum": ref.config.moe.top_k, "a third": n // 3, "all": n}[slots]
    model = load_pretrained(path, max_expert_memory=count * one)
    cache = cache_of(model)
    assert cache.n_slots == count and cache.n_slots * cache.expert_bytes <= count * one
    assert torch.equal(_tokens(model), _tokens(ref))
    assert cache.stats.misses > 0 and cache.stats.bytes_read == cache.stats.reads * cache.expert_bytes


@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_rows_of_an_engine_stay_independent_and_named_backends_are_honoured(checkpoints, name):
    path, one = checkpoints[name]
    ref, model = load_pretrained(path), load_pretrained(path, max_expert_memory=5 * one)
    assert torch.equal(_tokens(model, decode_rows=4), _tokens(ref, decode_rows=4))
    assert torch.equal(_tokens(model, backend="reference"), _tokens(ref, backend="reference"))


def test_auto_chooses_the_backend_for_the_layers_experts_not_the_slots(checkpoints, monkeypatch):
    # bf16 on the CPU: auto picks grouped_mm below 4 rows per expert, expert_loop above; the slab has more slots
    # than the layer has experts, so choosing by slots would run a 40-row prefill on grouped_mm.
    path, one = checkpoints["hf-mixtral"]
    chosen = []
    select = kernels.select

    def spy(backend, device, dtype=torch.float32, n_rows=None, n_experts=None, **kw):
        record = select(backend, device, dtype, n_rows, n_experts, **kw)
        if backend == "auto" and n_rows is not None:
            chosen.append((n_rows, n_experts, record.name))
        return record

    prompt = [list(range(1, 21))]
    ref = load_pretrained(path, dtype=torch.bfloat16)
    model = load_pretrained(path, dtype=torch.bfloat16, max_expert_memory=20 * one)
    monkeypatch.setattr(kernels, "select", spy)
    assert torch.equal(smoe.generate(model, prompt, max_new_tokens=3), smoe.generate(ref, prompt, max_new_tokens=3))
    assert (40, 8, "expert_loop") in chosen and all(n == 8 for _, n, _ in chosen)


# --- the budget --------------------------------------------------------------------------------------------------


def test_sizes_parse_in_decimal_and_binary_units_and_bad_ones_name_the_field():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1.5kB") == 1500
    assert parse_size(4096) == 4096 and parse_size(" 2 gib ") == 2 * 2**30
    for bad in ("4G", "lots", "-1GB", "0", 0, 1.5, True):
        with pytest.raises(ValueError, match="max_expert_memory"):
            parse_size(bad)


def test_settings_without_a_budget_are_refused_by_name():
    with pytest.raises(ValueError, match="expert_cache_policy: only with `max_expert_memory`"):
        OffloadConfig(expert_cache_policy="lfu").validate()
    with pytest.raises(ValueError, match="expert_io_threads"):
        OffloadConfig(max_expert_memory="1GB", expert_io_threads=0).validate()


def test_a_budget_below_one_layers_active_experts_fails_naming_the_minimum_before_reading_weights(checkpoints,
                                                                                                  monkeypatch):
    path, one = checkpoints["fp32"]
    read = []
    monkeypatch.setattr(SafetensorsFile, "view", lambda self, name: read.append(name))
    with pytest.raises(ValueError, match=rf"max_expert_memory: .* one layer's 2 active experts need at least .* "
                                         rf"\({2 * one} bytes\)"):
        load_pretrained(path, max_expert_memory=2 * one - 1)
    assert not read


def test_the_budget_plan_counts_the_bytes_the_loaded_experts_take(checkpoints):
    # The config-only arithmetic (smoe inspect, smoe cost) against what a loaded model allocates per slot.
    for name, fmt in [("fp32", "fp32"), ("int8", "int8"), ("int4", "int4")]:
        path, one = checkpoints[name]
        model = load_pretrained(path, max_expert_memory=10 * one)
        config = model.config
        assert expert_bytes(config, fmt, config.quantization and config.quantization.group_size) == one
        assert cache_of(model).expert_bytes == one
    config = presets.get("deepseek-v2-lite")
    p = plan(config, "2GB", "int4", hit_rate=0.5)
    assert p.n_experts == 26 * 64 and p.slots == 2 * 10**9 // p.expert_bytes
    assert p.bytes_read_per_token == pytest.approx(0.5 * 6 * 26 * p.expert_bytes)
    assert not plan(config, p.minimum - 1, "int4").fits and plan(config, p.minimum, "int4").fits


def test_the_experts_are_not_in_the_models_memory_and_saving_it_is_refused(checkpoints, tmp_path):
    path, one = checkpoints["fp32"]
    full, model = load_pretrained(path), load_pretrained(path, max_expert_memory=4 * one)
    assert all(isinstance(m.experts, OffloadedExperts) for m in model.moe_layers)
    routed = sum(m.experts.w_gate_up.numel() + m.experts.w_down.numel() for m in full.moe_layers)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in full.parameters()) - routed
    with pytest.raises(ValueError, match="read from disk on demand"):
        save_model_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compiling_a_decode_step_over_offloaded_experts_is_refused_naming_compile(checkpoints):
    path, one = checkpoints["fp32"]
    model = load_pretrained(path, max_expert_memory=4 * one)
    with pytest.raises(ValueError, match="compile: the routed experts are read from disk"):
        smoe.generate(model, PROMPTS, max_new_tokens=2, compile=True)


def test_generate_and_its_flags_on_the_command_line(checkpoints, capsys):
    path, one = checkpoints["fp32"]
    assert main(["generate", str(path), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "4"]) == 0
    want = capsys.readouterr().out
    assert main(["generate", str(path), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "4", "--max-expert-memory",
                 str(3 * one), "--expert-cache-policy", "lfu", "--expert-prefetch", "off"]) == 0
    out = capsys.readouterr()
    assert out.out == want and "expert cache: hit rate" in out.err
    for flags, message in [(["--max-expert-memory", "1B"], "--max-expert-memory: 1 B holds 0 expert"),
                           (["--max-expert-memory", "4G"], "--max-expert-memory: '4G' is not a size"),
                           (["--expert-io-threads", "4"], "--expert-io-threads: only with --max-expert-memory"),
                           (["--max-expert-memory", "1GB", "--quantize", "int8"], "smoe convert --quantize"),
                           (["--max-expert-memory", "1GB", "--compile"], "compile: the routed experts are read")]:
        assert main(["generate", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "2", *flags]) == 2
        assert message in capsys.readouterr().err


def test_inspect_and_cost_say_what_a_budget_means(capsys):
    # DeepSeek-V2-Lite: 26 MoE layers of 64 experts (3 x 2048 x 1408 weights each), top-6.
    assert main(["inspect", "deepseek-v2-lite", "--max-expert-memory", "4GB", "--json"]) == 0
    plans = {p["format"]: p for p in json.loads(capsys.readouterr().out)["expert_budget"]}
    weights = 3 * 2048 * 1408
    assert plans["bf16"]["expert_bytes"] == 2 * weights and plans["int4"]["expert_bytes"] == weights // 2 + 8 * (
        2 * 1408 * 2048 // 64 + 2048 * 1408 // 64)
    bf16 = plans["bf16"]
    assert bf16["slots"] == 4 * 10**9 // (2 * weights) and bf16["n_experts"] == 26 * 64
    assert bf16["bytes_read_per_token"] == pytest.approx((1 - bf16["slots"] / 1664) * 6 * 26 * 2 * weights)
    assert main(["inspect", "mixtral-8x7b", "--max-expert-memory", "300MB", "--hit-rate", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "bf16: experts 90.19 GB, 352.32 MB each; too small: one layer's 2 active experts need at least 704.64 MB" \
        in out and "hit rate 50% (given)" in out
    assert main(["inspect", "mixtral-8x7b", "--hit-rate", "0.5"]) == 2
    assert "--hit-rate: only with --max-expert-memory" in capsys.readouterr().err

    assert main(["cost", "deepseek-v2-lite", "--hardware", "h100-sxm", "--weights", "bf16", "--batch", "1",
                 "--max-expert-memory", "4GB", "--expert-hit-rate", "0.25", "--disk-bandwidth", "2e9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    step, budget = report["decode"][0], report["expert_budget"]
    assert budget["expert_bytes"] == 2 * weights and budget["slots"] == 4 * 10**9 // (2 * weights)
    assert step["disk_bytes"] == pytest.approx(0.75 * 6 * 26 * 2 * weights) and step["bound"] == "disk"
    assert step["seconds"] == pytest.approx(step["bytes"] / 3.35e12 + step["disk_bytes"] / 2e9, rel=1e-3)
    assert step["memory_bytes_per_device"] < report["weight_bytes"] / 4
    for flags, message in [(["--disk-bandwidth", "2e9"], "--disk-bandwidth: only with --max-expert-memory"),
                           (["--max-expert-memory", "10MB"], "--max-expert-memory: 10,000,000 bytes hold 0 expert")]:
        assert main(["cost", "deepseek-v2-lite", *flags]) == 2
        assert message in capsys.readouterr().err


# --- the cache ---------------------------------------------------------------------------------------------------


def test_each_policy_evicts_its_lowest_priority():
    def victim(policy, uses):
        p = _Priorities(policy)
        for key, (_, tokens) in uses.items():
            p.loaded(key)
            p.route(key, tokens)
        for key, (n, _) in uses.items():
            for _ in range(n):
                p.used(key)
        return p.lowest(lambda key: True)

    uses = {(0, 0): (3, 1), (0, 1): (0, 9), (0, 2): (1, 5)}  # key: (uses after all are read, tokens routed)
    assert victim("lru", uses) == (0, 1)  # never used since its read: least recent
    assert victim("lfu", uses) == (0, 1)
    assert victim("load", uses) == (0, 0)  # one token routed to it
    p = _Priorities("lru")
    for key in uses:
        p.loaded(key)
    assert p.lowest(lambda key: key != (0, 0)) == (0, 1)  # held or pinned ones are skipped


def test_load_counts_decay_so_that_recent_routing_outweighs_old():
    old, new, other = (0, 0), (0, 1), (1, 0)
    for half_life, victim in [(None, new), (10.0, old)]:
        p = _Priorities("load", half_life)
        for key in (old, new):
            p.loaded(key)
        p.route(old, 100)  # popular long ago ...
        for _ in range(40):
            p.route(other, 10)  # ... then 400 tokens elsewhere (40 half-lives)
        p.route(new, 30)  # ... and a little recently
        assert p.lowest(lambda key: True) == victim
    p = _Priorities("load", 1.0)  # weights past 2 ** 64 are rescaled: every count alike, the order kept
    for key in (old, new):
        p.loaded(key)
    p.route(new, 2)
    p.route(other, 200)
    p.route(old, 1)
    assert p.weight < 2.0**64 and p.lowest(lambda key: True) == new
    assert p.current[old][0] > 0 and p.load[old] > p.load[new] > 0


def test_lookahead_prefetches_the_next_layers_guess_and_off_reads_only_on_demand(checkpoints):
    path, one = checkpoints["int4"]
    ref = _tokens(load_pretrained(path))
    ahead = load_pretrained(path, max_expert_memory=12 * one)
    off = load_pretrained(path, offload=OffloadConfig(max_expert_memory=12 * one, expert_prefetch="off"))
    assert torch.equal(_tokens(ahead), ref) and torch.equal(_tokens(off), ref)
    a, o = cache_of(ahead).stats, cache_of(off).stats
    assert a.prefetched > 0 and a.lookahead_needed > 0 and 0 < a.lookahead_right <= a.lookahead_guessed
    assert o.prefetched == o.late_hits == o.lookahead_guessed == 0 and o.reads == o.misses


def test_pinned_experts_are_read_at_load_and_never_evicted(checkpoints, tmp_path):
    path, one = checkpoints["fp32"]
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"0": [3, 5], "2": [1]}))
    model = load_pretrained(path, offload=OffloadConfig(max_expert_memory=5 * one, pin_experts=str(pins)))
    cache = cache_of(model)
    assert cache.resident() == {(0, 3), (0, 5), (2, 1)} and cache.stats.reads == 3
    assert torch.equal(_tokens(model), _tokens(load_pretrained(path)))
    assert {(0, 3), (0, 5), (2, 1)} <= cache.resident() and cache.stats.evictions > 0
    for content, message in [("[1]", "expected an object"), ('{"7": [0]}', "'7' is not a MoE layer"),
                             ('{"0": [8]}', r"expert ids in \[0, 8\)"), ('{"0": [0, 1, 2, 3]}', "pins 4 experts")]:
        pins.write_text(content)
        with pytest.raises(ValueError, match=f"pin_experts: .*{message}"):
            load_pretrained(path, offload=OffloadConfig(max_expert_memory=5 * one, pin_experts=str(pins)))


def test_a_failed_read_fails_the_call_naming_the_expert_and_the_cache_recovers(checkpoints, tmp_path):
    path, one = checkpoints["fp32"]
    model = load_pretrained(path, offload=OffloadConfig(max_expert_memory=3 * one, expert_prefetch="off"))
    cache = cache_of(model)
    broken = cache.files.read

    def read(key, slot, drop_page_cache=False):
        if key == (1, 4):
            raise OSError("device error")
        return broken(key, slot, drop_page_cache)

    cache.files.read = read
    with pytest.raises(OSError, match="reading expert 4 of layer 1 failed: device error"):
        for _ in range(20):
            smoe.generate(model, [[int(t) for t in torch.randint(0, 256, (12,))]], max_new_tokens=3)
    cache.files.read = broken
    assert sum(cache.held) == 0 and (1, 4) not in cache.slot_of
    assert torch.equal(_tokens(model), _tokens(load_pretrained(path)))


# --- memory ------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import smoe, smoe.generation, smoe.interop.hf
    from smoe.kernels import cpp_experts
    from smoe.offload.experts import cache_of

    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

    torch.set_num_threads(1)
    cpp_experts.build()  # its library in memory before the baseline
    base = status("VmRSS")
    model = smoe.load_pretrained(sys.argv[1], max_expert_memory=sys.argv[2])
    tokens = smoe.generate(model, [list(range(1, 17))], max_new_tokens=8)
    cache = cache_of(model)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "tokens": tokens.tolist(),
                      "weights": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
                      "cache": cache.n_slots * cache.expert_bytes}))
""")
MARGIN = 64 * 2**20  # activations, the decode cache, allocator and thread arenas, load-time views


@pytest.mark.slow
def test_peak_resident_memory_stays_within_budget_plus_other_weights_plus_a_margin(tmp_path):
    # 300 MB of experts, a 25 MB budget. The peak is the child's own high-water mark (VmHWM, which a fresh exec
    # starts anew; getrusage's ru_maxrss would keep this process's).
    model = _model("mixtral-tiny", n_layers=4, dim=512, **{"moe.expert_dim": 1536, "attention.n_heads": 8,
                                                          "attention.n_kv_heads": 2})
    path = save_model_checkpoint(model, tmp_path / "ck")
    experts = sum(m.experts.w_gate_up.numel() + m.experts.w_down.numel() for m in model.moe_layers) * 4
    want = smoe.generate(model, [list(range(1, 17))], max_new_tokens=8).tolist()
    del model
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "25MB"], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["tokens"] == want and r["cache"] <= 25 * 10**6
    assert r["peak"] - r["base"] <= r["weights"] + 25 * 10**6 + MARGIN < experts / 2
