"""Hugging Face interop through the production converter: tiny random models that transformers itself builds and
saves, loaded with smoe.load_pretrained (fp32 logit parity), and exported back (transformers loads the export with
the same logits). Also: sharded and FP8 checkpoints, DeepSeek-V3's MTP layer, and every bad-input error."""

import json
import warnings

import pytest
import torch

from smoe import load_pretrained, presets, save_pretrained
from smoe.cli import main
from smoe.interop.hf import save_model_checkpoint, stored_dtype
from smoe.interop.hf_config import config_to_hf
from smoe.io.safetensors import SafetensorsFile
from smoe.models import build_model

transformers = pytest.importorskip("transformers")
from hf_helpers import hf_logits  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# model_type -> (preset, our overrides, extra transformers config keys)
CASES = {
    "mixtral": ("mixtral-tiny", {}, {}),
    "qwen2_moe": ("qwen2-moe-tiny", {}, {}),  # shared expert with its sigmoid gate, qkv bias
    "qwen2_moe-sparse-step": ("qwen2-moe-tiny", {}, {"decoder_sparse_step": 2, "mlp_only_layers": []}),
    "qwen3_moe": ("qwen3-moe-tiny", {}, {}),  # head_dim != dim / heads, per-head qk-norm
    "olmoe": ("olmoe-tiny", {}, {}),  # qk-norm over all heads
    "deepseek_v2": ("deepseek-v2-tiny", {"attention.q_lora_rank": None}, {}),  # MLA without q_lora
    "deepseek_v2-q_lora": ("deepseek-v2-tiny", {}, {}),
    "deepseek_v3": ("deepseek-v3-tiny", {"layout.n_mtp_modules": 0}, {}),  # groups + bias, shared, dense first
    # top-1: transformers' DeepseekV3 and Mixtral renormalise the single weight to 1, its DeepseekV2 never does
    "deepseek_v3-top1": ("deepseek-v3-tiny", {"layout.n_mtp_modules": 0, "moe.top_k": 1}, {}),
    "deepseek_v2-top1": ("deepseek-v2-tiny", {"moe.top_k": 1}, {"norm_topk_prob": True}),
    "mixtral-top1": ("mixtral-tiny", {"moe.top_k": 1}, {}),
    "dbrx": ("dbrx-tiny", {}, {}),  # fused Wqkv and experts, clip_qkv, LayerNorm
    "minimax_m2": ("minimax-tiny", {}, {}),  # sigmoid + selection bias, partial rotary
    # the dense Llama family, which smoe.upcycle starts from
    "llama": ("dense", {"attention.n_kv_heads": 2}, {}),  # GQA
    "llama-head-dim": ("dense", {"attention.head_dim": 32}, {}),  # head_dim != dim / heads
    "mistral": ("dense", {"attention.sliding_window": 16}, {}),  # the window is shorter than the 24 tokens
    "qwen2": ("dense", {"attention.qkv_bias": True, "tie_embeddings": True}, {}),
}
IDS = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(1))  # below every case's vocabulary


def _hf_model(case: str):
    preset, changes, extra = CASES[case]
    model_type = case.split("-")[0]
    config = presets.get(preset, **{"n_layers": 2, **changes})
    hf_dict = {**config_to_hf(config, model_type), **extra}
    hf_dict.pop("model_type")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.AutoConfig.for_model(model_type, **hf_dict)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, tensor in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensor.normal_(0, 0.1)  # a non-zero correction bias changes which experts are selected
    return model


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_and_export_round_trips(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="4MB" if case == "mixtral" else "1GB")  # mixtral: sharded
    ours = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want, got = hf(IDS).logits, ours(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    save_pretrained(ours, tmp_path / "back")
    torch.testing.assert_close(hf_logits(tmp_path / "back", IDS), want, rtol=0, atol=0)  # the same weights, bit for bit


def test_mixtral_case_really_is_sharded(tmp_path):
    _hf_model("mixtral").save_pretrained(tmp_path, max_shard_size="4MB")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert load_pretrained(tmp_path).config.moe.n_routed_experts == 8


def test_deepseek_v3_mtp_layer_is_kept_both_ways(tmp_path):
    torch.manual_seed(0)
    ours = build_model(presets.get("deepseek-v3-tiny", n_layers=2)).eval()
    assert ours.config.layout.n_mtp_modules == 1
    save_pretrained(ours, tmp_path / "hf", model_type="deepseek_v3")
    names = SafetensorsFile(tmp_path / "hf" / "model.safetensors").keys()
    assert {"model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight", "model.layers.2.shared_head.head.weight",
            "model.layers.2.mlp.experts.0.gate_proj.weight"} <= set(names)

    back = load_pretrained(tmp_path / "hf")
    assert back.config.layout.n_mtp_modules == 1
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with torch.no_grad():  # transformers skips the MTP layer and computes the same logits
        torch.testing.assert_close(hf_logits(tmp_path / "hf", IDS), ours(IDS).logits, rtol=1e-4, atol=1e-5)


def test_mtp_announced_but_absent_is_dropped(tmp_path):
    _hf_model("deepseek_v3").save_pretrained(tmp_path)  # transformers builds no MTP layer
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_pretrained(tmp_path).config.layout.n_mtp_modules == 0


def _quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block)
    padded[:rows, :cols] = w
    tiles = padded.view(br, block, bc, block)
    scale = tiles.abs().amax(dim=(1, 3)) / 448.0 + 1e-12
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(br * block, bc * block)[:rows, :cols]
    return q.contiguous(), scale.float()


def _fp8_checkpoint(root) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 tiny at ``root`` with its projections quantised to fp8 in 32 x 32 tiles (ragged at the edges),
    as DeepSeek publishes it; returns the dequantised weights the load must give."""
    _hf_model("deepseek_v3").save_pretrained(root)
    tensors = load_file(root / "model.safetensors")
    quantized, expected = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and "proj" in name:
            q, scale = _quantize_fp8(t, 32)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            expected[name] = q.float() * scale.repeat_interleave(32, 0)[: t.shape[0]].repeat_interleave(32, 1)[
                :, : t.shape[1]]
        else:
            quantized[name] = expected[name] = t
    save_file(quantized, root / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32], "fmt": "e4m3"}
    config["dtype"] = "bfloat16"  # as DeepSeek-V3's config.json says of its FP8 checkpoint
    (root / "config.json").write_text(json.dumps(config))
    assert quantized["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    return expected


def test_fp8_block_scales_are_dequantised_on_load(tmp_path):
    expected = _fp8_checkpoint(tmp_path / "hf")
    assert next(load_pretrained(tmp_path / "hf").parameters()).dtype == torch.bfloat16
    model = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    reference_dir = tmp_path / "dequantized"
    reference_dir.mkdir()
    save_file(expected, reference_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["quantization_config"]
    (reference_dir / "config.json").write_text(json.dumps(config))
    reference = load_pretrained(reference_dir, dtype=torch.float32)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_dtype_and_device_arguments(tmp_path):
    _hf_model("deepseek_v3").save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[1].ffn.router.expert_bias.dtype == torch.float32  # selection stays exact
    assert not model.training


@pytest.mark.parametrize("native", [False, True])
def test_bf16_weights_get_their_fp32_compute_copy_once_at_load_where_bf16_is_emulated(tmp_path, monkeypatch, native):
    from smoe.kernels import registry

    monkeypatch.setattr(registry, "native_low_precision", lambda dtype: native)
    _hf_model("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    want = torch.bfloat16 if native else torch.float32
    assert load_pretrained(tmp_path / "hf").embed.weight.dtype == want
    assert load_pretrained(tmp_path / "hf", dtype=torch.bfloat16).embed.weight.dtype == torch.bfloat16
    # a conversion keeps the stored precision whatever this CPU computes in
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "smoe")]) == 0
    assert load_pretrained(tmp_path / "smoe").embed.weight.dtype == want
    assert load_pretrained(tmp_path / "smoe", dtype=torch.bfloat16).embed.weight.dtype == torch.bfloat16
    assert stored_dtype(tmp_path / "smoe") == stored_dtype(tmp_path / "hf") == torch.bfloat16


def test_smoe_checkpoint_loads_and_converts_through_the_cli(tmp_path, capsys):
    hf = _hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "smoe")]) == 0
    assert (tmp_path / "smoe" / "model.safetensors").is_file()
    assert main(["convert", str(tmp_path / "smoe"), "--to", "hf", "--out", str(tmp_path / "back")]) == 0
    assert "Hugging Face qwen3_moe" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "back", IDS), hf(IDS).logits, rtol=0, atol=0)
        torch.testing.assert_close(load_pretrained(tmp_path / "smoe")(IDS).logits, hf(IDS).logits, rtol=1e-4,
                                   atol=1e-5)


def test_trained_run_exports_with_its_tokenizer(tmp_path):
    from smoe.train.checkpoint import save_checkpoint

    config = presets.get("mixtral-tiny", n_layers=1, vocab_size=300)
    model = build_model(config)
    tokenizer = json.dumps({"added_tokens": [{"id": 0, "content": "<|endoftext|>"}], "model": {"type": "BPE"}})
    save_checkpoint(tmp_path / "run", 5, model, torch.optim.AdamW(model.parameters()), config, {}, tokenizer)
    assert main(["convert", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == "mixtral" and saved["eos_token_id"] == 0
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text()) == json.loads(tokenizer)
    with torch.no_grad():
        ids = IDS % 300
        want = model.eval()(ids).logits
    assert torch.equal(load_pretrained(tmp_path / "hf")(ids).logits, want)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    _hf_model("mixtral").save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_model_type_lists_supported(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "llama4"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama4'; supported: mixtral, qwen2_moe"):
        load_pretrained(saved)


def test_missing_key_names_it(saved):
    _rewrite(saved / "model.safetensors", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ValueError, match=r"missing key 'model.layers.1.block_sparse_moe.experts.3.w2.weight'"):
        load_pretrained(saved)


def test_unexpected_key_names_file_and_key(saved):
    _rewrite(saved / "model.safetensors", lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected key 'model.layers.0.mystery.weight'"):
        load_pretrained(saved)


def test_shape_mismatch_names_file_and_key(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.layers\.0\.block_sparse_moe\.experts\.0\.w1"
                                         r"\.weight has shape \[512, 256\]"):
        load_pretrained(saved)


@pytest.mark.parametrize("claimed", [1, 3, 10**3])
def test_layer_count_is_compared_with_the_checkpoint_before_building(saved, monkeypatch, claimed):
    monkeypatch.setattr("smoe.interop.hf.build_model", lambda *a: pytest.fail("built before the layer count check"))
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "num_hidden_layers": claimed}))
    with pytest.raises(ValueError, match=rf"config\.json: describes {claimed} layers, but .*model\.safetensors "
                                         r"holds 2 \(model\.layers\.<i>\.\* keys\)"):
        load_pretrained(saved)


def test_mtp_layer_counts_towards_the_checkpoint_layers(tmp_path):
    ours = build_model(presets.get("deepseek-v3-tiny", n_layers=2))
    save_pretrained(ours, tmp_path / "hf", model_type="deepseek_v3")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match=r"describes 2 layers, but .* holds 3"):  # the MTP layer is not announced
        load_pretrained(tmp_path / "hf")


def test_truncated_shard_names_file_and_key(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated; .+ ends at byte"):
        load_pretrained(saved)


def test_missing_shard_names_it(tmp_path):
    _hf_model("mixtral").save_pretrained(tmp_path, max_shard_size="4MB")
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    (tmp_path / shard).unlink()
    with pytest.raises(ValueError, match=f"{shard}: missing shard"):
        load_pretrained(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    _hf_model("mixtral").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="safetensors only"):
        load_pretrained(tmp_path)


def test_export_refuses_a_non_empty_directory_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    model = build_model(presets.get("mixtral-tiny", n_layers=1))
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_pretrained(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_export_names_what_a_family_cannot_express(tmp_path):
    model = build_model(presets.get("deepseekmoe", n_layers=1))  # GQA + ungated shared experts
    with pytest.raises(ValueError, match="no transformers family expresses this model"):
        save_pretrained(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"attention: cannot be expressed as a Hugging Face deepseek_v3 config"):
        save_pretrained(model, tmp_path / "x", model_type="deepseek_v3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
    save_model_checkpoint(model, tmp_path / "ours")  # our own format holds any model
    assert torch.equal(load_pretrained(tmp_path / "ours").embed.weight, model.embed.weight)


def test_export_leaves_nothing_behind_when_it_fails(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("smoe.interop.hf._write_shards", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(build_model(presets.get("mixtral-tiny", n_layers=1)), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- untrusted indexes, shards and fp8 scales: refused on the headers, before a model is built -------------------


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    """A sharded Mixtral checkpoint; building a model from it fails the test (every check runs before)."""
    _hf_model("mixtral").save_pretrained(tmp_path, max_shard_size="4MB")

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the checkpoint was checked")

    monkeypatch.setattr("smoe.interop.hf.empty_model", no_build)
    return tmp_path


def _edit_index(root, edit):
    index = json.loads((root / "model.safetensors.index.json").read_text())
    edit(index["weight_map"])
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def _shards(root) -> list[str]:
    return sorted(set(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"].values()))


@pytest.mark.parametrize("weight_map", [["a"], {"lm_head.weight": 3}, None])
def test_index_weight_map_must_map_names_to_files(sharded, weight_map):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"index\.json: weight_map must be an object mapping tensor names"):
        load_pretrained(sharded)


def test_index_that_is_not_an_object_is_refused(sharded):
    (sharded / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"index\.json: expected an object at the top level"):
        load_pretrained(sharded)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors",
                                   "link.safetensors"])
def test_index_shards_must_stay_inside_the_model_directory(sharded, shard):
    outside = sharded.parent / "outside.safetensors"
    outside.write_bytes((sharded / _shards(sharded)[0]).read_bytes())
    (sharded / "link.safetensors").symlink_to(outside)
    _edit_index(sharded, lambda m: m.update({"lm_head.weight": shard}))
    with pytest.raises(ValueError, match=rf"index\.json: weight_map\['lm_head.weight'\] = '{shard}' is not a file "
                                         "inside"):
        load_pretrained(sharded)


def test_shard_may_not_hold_a_key_the_index_maps_to_another_shard(sharded):
    first, second = _shards(sharded)[:2]
    theirs = load_file(sharded / second)
    name = next(iter(theirs))
    _rewrite(sharded / first, lambda t: t.update({name: torch.zeros_like(theirs[name])}))
    with pytest.raises(ValueError, match=rf"{first}: holds key '{name}', which .*index\.json maps to {second}"):
        load_pretrained(sharded)


def test_shard_may_not_hold_a_key_the_index_does_not_list(sharded):
    first = _shards(sharded)[0]
    _rewrite(sharded / first, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=rf"{first}: holds key 'model.layers.0.mystery.weight', which .*index\.json "
                                         "does not list"):
        load_pretrained(sharded)


@pytest.fixture
def fp8(tmp_path, monkeypatch):
    _fp8_checkpoint(tmp_path)
    monkeypatch.setattr("smoe.interop.hf.empty_model", lambda *a: pytest.fail("built before the checks"))
    return tmp_path


@pytest.mark.parametrize("block", [[0, 32], [32], [32, 32, 32], [True, 32], [32.0, 32], "32"])
def test_fp8_block_size_must_be_two_positive_integers(fp8, block):
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = block
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: quantization_config\.weight_block_size must be two "
                                         "positive integers"):
        load_pretrained(fp8)


_KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


def test_fp8_weight_without_its_scale_is_refused(fp8):
    _rewrite(fp8 / "model.safetensors", lambda t: t.pop(_KV_B + "_scale_inv"))
    with pytest.raises(ValueError, match=rf"model\.safetensors: {_KV_B} is fp8 without {_KV_B}_scale_inv"):
        load_pretrained(fp8)


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_fp8_scale_must_have_one_float_per_block(fp8, change):
    def edit(t):
        scale = t[_KV_B + "_scale_inv"]
        t[_KV_B + "_scale_inv"] = scale[:, :-1].contiguous() if change == "shape" else scale.to(torch.int32)

    _rewrite(fp8 / "model.safetensors", edit)
    with pytest.raises(ValueError, match=rf"model\.safetensors: {_KV_B}_scale_inv has shape .* expected "
                                         r"\[\d+, \d+\] \(one scale per 32x32 block"):
        load_pretrained(fp8)
