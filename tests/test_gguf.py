"""smoe convert --to gguf (smoe.interop.gguf): files the gguf package reads back with our weights, in llama.cpp's
layout for each family; logits parity with llama.cpp where llama-cpp-python is installed."""

import importlib.util

import numpy as np
import pytest
import torch

import smoe
from smoe import presets
from smoe.cli import main
from smoe.config import RopeScaling
from smoe.interop.gguf import write_gguf
from smoe.interop.hf import load_pretrained, save_model_checkpoint
from smoe.models import build_model

gguf = pytest.importorskip("gguf")

# model_type -> (preset, changes): the families llama.cpp runs, as llama.cpp's graphs compute them.
FAMILIES = {
    "mixtral": ("mixtral-tiny", {}),
    "qwen2_moe": ("qwen2-moe-tiny", {"moe.norm_topk_prob": False}),
    "qwen3_moe": ("qwen3-moe-tiny", {}),
    "deepseek_v2": ("deepseek-v2-tiny", {"moe.n_group": 1, "moe.topk_group": 1, "max_seq_len": 64,  # V2's YaRN
                                         "attention.rope_scaling": RopeScaling(factor=4.0, original_max_seq_len=16,
                                                                               mscale=0.707, mscale_all_dim=0.707)}),
    "deepseek_v3": ("deepseek-v3-tiny", {}),  # with an MTP layer, which GGUF leaves out as llama.cpp's converter does
}
IDS = list(range(5, 21))


def _model(model_type, **changes):
    preset, base = FAMILIES[model_type]
    torch.manual_seed(0)
    return build_model(presets.get(preset, **{"n_layers": 3, "vocab_size": 512, **base, **changes})).eval()


def _read(path) -> tuple[dict, dict]:
    """(metadata by key, tensor name -> (values as written, type)), via the gguf package's reader."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        tensors[t.name] = (torch.from_numpy(np.array(values, dtype=np.float32)), t.tensor_type)
    return fields, tensors


def _rope_pairs(w, heads):  # llama.cpp's LlamaModel.permute: rotate-half rows to adjacent pairs
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_gguf_package_reads_back_our_weights_in_llama_cpps_layout(model_type, tmp_path):
    model = _model(model_type)
    config, attn = model.config, model.config.attention
    path = write_gguf(model, tmp_path / "m.gguf", model_type=model_type)
    fields, tensors = _read(path)
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.get(model_type, "deepseek2")
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == config.n_layers
    assert fields[f"{arch}.expert_count"] == config.moe.n_routed_experts
    assert fields[f"{arch}.expert_used_count"] == config.moe.top_k
    assert all(t == gguf.GGMLQuantizationType.F32 for _, t in tensors.values())
    assert torch.equal(tensors["token_embd.weight"][0], model.embed.weight.detach())
    moe = next(i for i, b in enumerate(model.layers) if b.is_moe)
    experts, F = model.layers[moe].ffn.experts, config.moe.expert_dim
    assert torch.equal(tensors[f"blk.{moe}.ffn_gate_exps.weight"][0], experts.w_gate_up[:, :F].detach())
    assert torch.equal(tensors[f"blk.{moe}.ffn_up_exps.weight"][0], experts.w_gate_up[:, F:].detach())
    assert torch.equal(tensors[f"blk.{moe}.ffn_down_exps.weight"][0], experts.w_down.detach())
    a = model.layers[0].attn
    if arch == "llama":
        assert torch.equal(tensors["blk.0.attn_q.weight"][0], _rope_pairs(a.wq.weight.detach(), attn.n_heads))
        assert torch.equal(tensors["blk.0.attn_k.weight"][0], _rope_pairs(a.wk.weight.detach(), attn.n_kv_heads))
    elif arch == "deepseek2":  # kv_b per head: nope rows (transposed) to k_b, value rows to v_b
        kv = a.wkv_b.weight.detach().view(attn.n_heads, attn.qk_nope_head_dim + attn.v_head_dim, -1)
        assert torch.equal(tensors["blk.0.attn_k_b.weight"][0], kv[:, :attn.qk_nope_head_dim].transpose(1, 2))
        assert torch.equal(tensors["blk.0.attn_v_b.weight"][0], kv[:, attn.qk_nope_head_dim:])
        assert not any(name.startswith(f"blk.{config.n_layers}.") for name in tensors)  # no MTP layer
    else:
        assert torch.equal(tensors["blk.0.attn_q.weight"][0], a.wq.weight.detach())


# A block of 32 holds d = max|w| / levels and each weight as a multiple of d: q8_0 rounds to the nearest (and
# stores d in fp16: 0.55 d), q4_0's 16 levels clip the far end of a block to within d (and fp16: 1.05 d).
@pytest.mark.parametrize("quantize, levels, bound", [("q8_0", 127, 0.55), ("q4_0", 8, 1.05)])
def test_quantised_files_hold_blocks_within_their_rounding_and_keep_norms_and_routers_f32(quantize, levels, bound,
                                                                                          tmp_path):
    model = _model("qwen3_moe")
    _, tensors = _read(write_gguf(model, tmp_path / "m.gguf", quantize=quantize))
    kind = getattr(gguf.GGMLQuantizationType, quantize.upper())
    w = model.layers[1].ffn.experts.w_down.detach()
    got, t = tensors["blk.1.ffn_down_exps.weight"]
    d = w.reshape(-1, 32).abs().amax(-1, keepdim=True) / levels
    assert t == kind and ((got.reshape(-1, 32) - w.reshape(-1, 32)).abs() <= bound * d + 1e-7).all()
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.attn_norm.weight", "blk.1.attn_q_norm.weight",
                 "output_norm.weight"):
        assert tensors[name][1] == gguf.GGMLQuantizationType.F32
    assert tensors["output.weight"][1] == kind and tensors["token_embd.weight"][1] == kind


def test_an_offloaded_or_quantised_checkpoint_converts_layer_by_layer_to_the_same_file(tmp_path):
    # The converter reads each layer's experts from disk (the CLI loads with max_expert_memory="min"); smoe's int4
    # experts are dequantised exactly, so the F32 file holds the weights the int4 model computes with.
    model = smoe.quantize(_model("deepseek_v2"), "int4")
    path = save_model_checkpoint(model, tmp_path / "ck")
    write_gguf(load_pretrained(path), tmp_path / "memory.gguf")
    write_gguf(load_pretrained(path, max_expert_memory="min"), tmp_path / "disk.gguf")
    assert (tmp_path / "memory.gguf").read_bytes() == (tmp_path / "disk.gguf").read_bytes()
    _, tensors = _read(tmp_path / "disk.gguf")
    from smoe.quant.format import dequantize

    assert torch.equal(tensors["blk.2.ffn_down_exps.weight"][0], dequantize(model.layers[2].ffn.experts.w_down.value()))


def test_what_llama_cpp_cannot_run_is_refused_by_name(tmp_path):
    cases = [(_model("mixtral"), "dbrx", "gguf: dbrx is not a family llama.cpp runs"),
             (_model("qwen2_moe", **{"moe.norm_topk_prob": True}), "qwen2_moe",
              "moe.norm_topk_prob: llama.cpp's qwen2moe keeps the top-k weights"),
             (_model("deepseek_v2", **{"moe.n_group": 2, "moe.topk_group": 1, "moe.group_score": "max"}),
              "deepseek_v2", "moe.group_score: llama.cpp's deepseek2 scores an expert group by the sum of its top two"),
             (_model("mixtral", **{"attention.sliding_window": 4}), "mixtral", "attention: llama.cpp's llama")]
    for model, model_type, message in cases:
        with pytest.raises(ValueError, match=message):
            write_gguf(model, tmp_path / "x.gguf", model_type=model_type)
    assert not list(tmp_path.iterdir())


def test_convert_to_gguf_on_the_command_line(tmp_path, capsys):
    path = save_model_checkpoint(_model("mixtral"), tmp_path / "ck")
    out = tmp_path / "m.gguf"
    assert main(["convert", str(path), "--to", "gguf", "--out", str(out), "--quantize", "q8_0"]) == 0
    assert "GGUF, q8_0 weights" in capsys.readouterr().out
    assert _read(out)[1]["blk.0.ffn_gate_exps.weight"][1] == gguf.GGMLQuantizationType.Q8_0
    for flags, message in [(["--to", "gguf", "--out", str(out)], "exists"),
                           (["--to", "gguf", "--out", str(tmp_path / "b.gguf"), "--quantize", "int8"],
                            "--quantize: a GGUF file is quantised as q8_0 or q4_0"),
                           (["--out", str(tmp_path / "d"), "--quantize", "q4_0"], "--quantize: q4_0 is a GGUF type")]:
        assert main(["convert", str(path), *flags]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_llama_cpp_computes_our_logits_from_the_f32_file(model_type, tmp_path):
    import llama_cpp

    model = _model(model_type)
    path = write_gguf(model, tmp_path / "m.gguf", model_type=model_type)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False)
    llm.eval(IDS)
    theirs = np.array(llm.scores[: len(IDS)])
    with torch.inference_mode():
        ours = model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 2e-3 * np.abs(ours).max()
