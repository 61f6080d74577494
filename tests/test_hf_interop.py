"""Hugging Face interop through the production converter: tiny random models that transformers itself builds and
saves, loaded with smoe.load_pretrained (fp32 logit parity), and exported back (transformers loads the export with
the same logits). Also: sharded and FP8 checkpoints, DeepSeek-V3's MTP layer, and every bad-input error."""

import json
import warnings

import pytest
import torch

from smoe import load_pretrained, presets, save_pretrained
from smoe.cli import main
from smoe.interop.hf import save_model_checkpoint
from smoe.interop.hf_config import config_to_hf
from smoe.interop.safetensors_stream import SafetensorsFile, write_safetensors
from smoe.models import build_model

transformers = pytest.importorskip("transformers")
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
}
IDS = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(1))


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


def _hf_logits(path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_and_export_round_trips(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="4MB" if case == "mixtral" else "1GB")  # mixtral: sharded
    ours = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want, got = hf(IDS).logits, ours(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    save_pretrained(ours, tmp_path / "back")
    torch.testing.assert_close(_hf_logits(tmp_path / "back"), want, rtol=0, atol=0)  # the same weights, bit for bit


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
        torch.testing.assert_close(_hf_logits(tmp_path / "hf"), ours(IDS).logits, rtol=1e-4, atol=1e-5)


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


def test_fp8_block_scales_are_dequantised_on_load(tmp_path):
    _hf_model("deepseek_v3").save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    quantized, expected = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and "proj" in name:  # the projections, as DeepSeek quantises them; 32 x 32 tiles, ragged
            q, scale = _quantize_fp8(t, 32)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            expected[name] = q.float() * scale.repeat_interleave(32, 0)[: t.shape[0]].repeat_interleave(32, 1)[
                :, : t.shape[1]]
        else:
            quantized[name] = expected[name] = t
    save_file(quantized, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32], "fmt": "e4m3"}
    config["dtype"] = "bfloat16"  # as DeepSeek-V3's config.json says of its FP8 checkpoint
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    assert next(load_pretrained(tmp_path / "hf").parameters()).dtype == torch.bfloat16
    model = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    reference_dir = tmp_path / "dequantized"
    reference_dir.mkdir()
    save_file(expected, reference_dir / "model.safetensors", metadata={"format": "pt"})
    del config["quantization_config"]
    (reference_dir / "config.json").write_text(json.dumps(config))
    reference = load_pretrained(reference_dir, dtype=torch.float32)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert quantized["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn


def test_dtype_and_device_arguments(tmp_path):
    _hf_model("deepseek_v3").save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[1].ffn.router.expert_bias.dtype == torch.float32  # selection stays exact
    assert not model.training


def test_smoe_checkpoint_loads_and_converts_through_the_cli(tmp_path, capsys):
    hf = _hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "smoe")]) == 0
    assert (tmp_path / "smoe" / "model.safetensors").is_file()
    assert main(["convert", str(tmp_path / "smoe"), "--to", "hf", "--out", str(tmp_path / "back")]) == 0
    assert "Hugging Face qwen3_moe" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(tmp_path / "back"), hf(IDS).logits, rtol=0, atol=0)
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


# --- the streaming safetensors reader and writer -----------------------------------------------------------------


def test_stream_writer_and_reader_agree_with_the_safetensors_package(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d": torch.randn(2, 2).to(torch.float8_e4m3fn), "e": torch.zeros(0, 3), "f": torch.tensor(2.5)}
    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.reshape(-1).view(torch.uint8))

    write_safetensors(tmp_path / "ours.safetensors", tensors.items(), {"format": "pt"})
    loaded = load_file(tmp_path / "ours.safetensors")
    assert loaded.keys() == tensors.keys() and all(same(loaded[k], tensors[k]) for k in tensors)
    save_file(tensors, tmp_path / "theirs.safetensors")
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name in f.keys():
            assert same(f.view(name), tensors[name]), name
            f.release(name)
