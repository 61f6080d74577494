"""smoe models -> GGUF files llama.cpp runs (``smoe convert PATH --to gguf``), with the ``gguf`` package's writer.

The families llama.cpp runs, each as its own converter (llama.cpp's convert_hf_to_gguf.py) writes them:

    mixtral                    -> llama      q and k rows permuted from rotate-half to adjacent rotary pairs
    qwen2_moe                  -> qwen2moe   a gated shared expert; llama.cpp keeps the top-k weights unnormalised
    qwen3_moe                  -> qwen3moe   q/k norms per head; top-k weights normalised
    deepseek_v2, deepseek_v3   -> deepseek2  MLA as MQA over the latent: kv_b split into k_b (transposed) and v_b;
                                             dense leading layers; V3's sigmoid scores and selection bias; no MTP

Every other family is refused by name, and so is what llama.cpp's graph for the family cannot compute (a routed
scale is folded into the experts' down projections where the architecture has none, as save_pretrained does).
Tensors: each layer's experts stacked ``(E, out, in)`` per projection (``ffn_gate_exps``, ``ffn_up_exps``,
``ffn_down_exps``), names from the package's tables (``gguf.TENSOR_NAMES``). Types follow llama.cpp's converter:
norms, biases, 1-d tensors and routers stay F32; the rest take the file's type: ``q8_0`` / ``q4_0`` (``quantize``),
else the weights' own float type (F32 for fp32 and for smoe's int8/int4, which are dequantised exactly; BF16,
F16). A tensor whose rows do not split into whole quantisation blocks stays F32.

The file is streamed: its header first (every tensor's name, shape and type), then one tensor at a time, each
layer's routed experts read whole once (from disk for a model loaded with ``max_expert_memory``, so a model larger
than memory converts in the memory of one layer's experts). Without a tokenizer.json beside the weights the file
gets a placeholder vocabulary (llama.cpp needs one to load; token ids are what it is fed then).

Legend: E experts, F expert hidden dim, D model dim, H heads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from smoe.config import MLAConfig, ModelConfig
from smoe.interop.hf import infer_model_type
from smoe.interop.hf_config import config_to_hf
from smoe.kernels.qweight import QWeight, dequantize
from smoe.models import Transformer
from smoe.offload.experts import stacked

ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "deepseek_v2": "deepseek2",
                 "deepseek_v3": "deepseek2"}
QUANTIZATIONS = ("q8_0", "q4_0")


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise ValueError("gguf: writing GGUF files needs the gguf package (pip install gguf)") from None
    return gguf


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its GGUF name, its shape as torch stores it (GGUF lists the dims reversed), and how
    to make its fp32 values."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    keep_f32: bool = False  # norms, biases, routers, 1-d tensors


def check_exportable(config: ModelConfig, model_type: str) -> str:
    """The GGUF architecture ``config`` is written as; raises naming the family or the field llama.cpp cannot
    run."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"gguf: {model_type} is not a family llama.cpp runs as smoe writes it; these are: "
                         f"{', '.join(ARCHITECTURES)}")
    config_to_hf(config, model_type)  # what the family itself cannot express
    arch, moe, attn = ARCHITECTURES[model_type], config.moe, config.attention

    def refuse(field: str, rule: str) -> None:
        raise ValueError(f"{field}: llama.cpp's {arch} {rule}")

    if config.layout.dense_residual or config.residual is not None:
        refuse("layout", "blocks are plain pre-norm residuals")
    if arch in ("llama", "qwen3moe") and not moe.norm_topk_prob:
        refuse("moe.norm_topk_prob", "renormalises the top-k weights")
    if arch == "qwen2moe":
        if moe.norm_topk_prob:
            refuse("moe.norm_topk_prob", "keeps the top-k weights as the softmax gives them")
        if not (moe.n_shared_experts and moe.shared_expert_gate):
            refuse("moe.n_shared_experts", "needs a shared expert with its sigmoid gate")
    if arch != "deepseek2":
        if any(not config.layout.is_moe(i) for i in range(config.n_layers)):
            refuse("layout", "has a MoE FFN in every layer")
        if attn.rotary_dim not in (None, attn.resolved_head_dim(config.dim)) or attn.sliding_window is not None:
            refuse("attention", "rotates whole heads over the whole context (no rotary_dim, no sliding_window)")
        if attn.rope_scaling is not None:
            refuse("attention.rope_scaling", "is written here without rope scaling")
    if arch == "deepseek2":
        if not (isinstance(attn, MLAConfig) and attn.rope_interleave and attn.rotary):
            refuse("attention.rope_interleave", "rotates adjacent pairs of MLA's rope dims, as DeepSeek stores them")
        if attn.rope_scaling is not None and attn.rope_scaling.type != "yarn":
            refuse("attention.rope_scaling", "extends DeepSeek's context with YaRN only")
        if moe.n_group > 1 and moe.group_score != "top2_sum":
            refuse("moe.group_score", "scores an expert group by the sum of its top two")
    return arch


def write_gguf(model: Transformer, out: str | Path, *, model_type: str | None = None, quantize: str | None = None,
               tokenizer_json: str | None = None) -> Path:
    """Write ``model`` to the GGUF file ``out`` (which must not exist; it appears only once complete) as its
    family's llama.cpp architecture (module docstring); ``quantize``: ``q8_0`` or ``q4_0`` for the matrices."""
    gguf = _gguf()
    config = replace(model.config, quantization=None)  # smoe's int8 / int4 weights are written dequantised
    model_type = model_type or infer_model_type(config)
    arch = check_exportable(config, model_type)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize: GGUF files here are written as {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: exists; give a new file name")
    float_type = {torch.bfloat16: "BF16", torch.float16: "F16"}.get(model.embed.weight.dtype, "F32")
    qtype = getattr(gguf.GGMLQuantizationType, (quantize or float_type).upper())
    tensors = _tensors(model, arch, model_type)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _hparams(writer, gguf, config, arch, model_type, quantize or float_type)
        _vocabulary(writer, gguf, config, tokenizer_json)
        types = []
        for t in tensors:
            kind = _type(gguf, t, qtype)
            types.append(kind)
            if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                numpy_dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(t.name, t.shape, np.dtype(numpy_dtype),
                                       math.prod(t.shape) * np.dtype(numpy_dtype).itemsize)
            else:
                shape = gguf.quants.quant_shape_to_byte_shape(t.shape, kind)
                writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, kind in zip(tensors, types, strict=True):
            writer.write_tensor_data(_encode(gguf, t.make().float().contiguous(), kind))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def _type(gguf, t: _Tensor, qtype):
    if t.keep_f32 or len(t.shape) <= 1 or qtype == gguf.GGMLQuantizationType.F32:
        return gguf.GGMLQuantizationType.F32
    if qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if t.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F32


def _encode(gguf, values: torch.Tensor, kind) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F32:
        return values.numpy()
    if kind == gguf.GGMLQuantizationType.F16:
        return values.half().numpy()
    if kind == gguf.GGMLQuantizationType.BF16:  # numpy has no bf16: its bytes, which the writer takes raw
        return values.bfloat16().view(torch.uint8).numpy()
    if values.dim() == 3:  # an expert at a time: the quantiser's temporaries are several times its input
        return np.stack([gguf.quants.quantize(v.numpy(), kind) for v in values])
    return gguf.quants.quantize(values.numpy(), kind)


# --- tensors -----------------------------------------------------------------------------------------------------


def _weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight in fp32 (smoe's int8 / int4 dequantised: ``kernels.qweight.dequantize``)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    return dequantize(module.value())


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().float()


def _rope_pairs(w_OD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered from the rotate-half layout (pairs i, i + d/2) to adjacent pairs
    (2i, 2i + 1), which llama.cpp's llama architecture rotates."""
    out, dim = w_OD.shape
    return w_OD.reshape(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


class _Experts:
    """A layer's routed experts, read once (from disk where they are offloaded) when the first of their three
    tensors is written, each projection made in fp32 when it is: gate (E, F, D), up (E, F, D), down (E, D, F)."""

    def __init__(self, experts: nn.Module, scale: float):
        self.experts, self.scale, self.stored = experts, scale, None

    def get(self, which: int) -> torch.Tensor:
        if self.stored is None:
            self.stored = stacked(self.experts)
        name = "w_down" if which == 2 else "w_gate_up"
        t = self.stored
        if name in t:
            value = t[name].float()
        else:  # smoe's int8 / int4: (E, O, I) stacks of QWeight; a group is I / (scale's last dim) inputs
            q, scale, offset = t[f"{name}.qweight"], t[f"{name}.scale"], t.get(f"{name}.offset")
            group = None if offset is None else q.shape[-1] * 2 // scale.shape[-1]
            value = dequantize(QWeight(q, scale, offset, group))
        if which < 2:
            value = value.chunk(2, dim=1)[which]
        else:
            self.stored = None  # written in order gate, up, down: the layer is done
            value = value * self.scale if self.scale != 1.0 else value
        return value


def _tensors(model: Transformer, arch: str, model_type: str) -> list[_Tensor]:
    gguf = _gguf()
    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    config, moe, attn = model.config, model.config.moe, model.config.attention
    out: list[_Tensor] = []

    def add(kind, shape, make, bid=None, suffix="weight", keep_f32=False):
        name = names[kind].format(bid=bid) + "." + suffix
        if kind not in gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, arch.upper())]:
            raise AssertionError(f"gguf: {name} is not a tensor of {arch}")  # a converter bug
        out.append(_Tensor(name, tuple(shape), make, keep_f32))

    def linear(kind, module, bid, rows=None):
        w = _weight(module) if rows is None else None
        shape = tuple(w.shape) if w is not None else tuple(rows(_weight(module)).shape)
        add(kind, shape, (lambda: w) if w is not None else (lambda: rows(_weight(module))), bid)
        b = _bias(module)
        if b is not None:
            add(kind, b.shape, lambda: b, bid, "bias", keep_f32=True)

    def param(kind, p, bid=None, suffix="weight", keep_f32=True, make=None):
        add(kind, p.shape, make or (lambda: p.detach().float()), bid, suffix, keep_f32)

    param(T.TOKEN_EMBD, model.embed.weight, keep_f32=False)
    # Families without a routed scale in llama.cpp get it folded into the down projections (save_pretrained too).
    fold = moe.routed_scaling_factor if arch != "deepseek2" else 1.0
    if arch == "deepseek2":
        D_nope, D_v, H = attn.qk_nope_head_dim, attn.v_head_dim, attn.n_heads
    for i, block in enumerate(model.layers):
        a, f = block.attn, block.ffn
        param(T.ATTN_NORM, block.attn_norm.weight, i)
        if arch == "deepseek2":
            if attn.q_lora_rank is None:
                linear(T.ATTN_Q, a.wq, i)
            else:
                linear(T.ATTN_Q_A, a.wq_a, i)
                param(T.ATTN_Q_A_NORM, a.q_norm.weight, i)
                linear(T.ATTN_Q_B, a.wq_b, i)
            linear(T.ATTN_KV_A_MQA, a.wkv_a, i)
            param(T.ATTN_KV_A_NORM, a.kv_norm.weight, i)

            def kv_b(part, a=a):
                w = _weight(a.wkv_b).view(H, D_nope + D_v, -1)
                return w[:, :D_nope].transpose(1, 2).contiguous() if part == "k" else w[:, D_nope:].contiguous()

            add(T.ATTN_K_B, (H, attn.kv_lora_rank, D_nope), lambda kv_b=kv_b: kv_b("k"), i)
            add(T.ATTN_V_B, (H, D_v, attn.kv_lora_rank), lambda kv_b=kv_b: kv_b("v"), i)
        else:
            permute = arch == "llama"
            linear(T.ATTN_Q, a.wq, i, (lambda w: _rope_pairs(w, attn.n_heads)) if permute else None)
            linear(T.ATTN_K, a.wk, i, (lambda w: _rope_pairs(w, attn.n_kv_heads)) if permute else None)
            linear(T.ATTN_V, a.wv, i)
            if attn.qk_norm == "head":
                param(T.ATTN_Q_NORM, a.q_norm.weight, i)
                param(T.ATTN_K_NORM, a.k_norm.weight, i)
        linear(T.ATTN_OUT, a.wo, i)
        param(T.FFN_NORM, block.ffn_norm.weight, i)
        if not block.is_moe:
            linear(T.FFN_GATE, f.gate, i)
            linear(T.FFN_UP, f.up, i)
            linear(T.FFN_DOWN, f.down, i)
            continue
        param(T.FFN_GATE_INP, f.router.weight, i)
        if f.router.expert_bias is not None:
            param(T.FFN_EXP_PROBS_B, f.router.expert_bias, i, "bias")
        experts = _Experts(f.experts, fold)
        E, F, D = moe.n_routed_experts, moe.expert_dim, config.dim
        add(T.FFN_GATE_EXP, (E, F, D), lambda x=experts: x.get(0), i)
        add(T.FFN_UP_EXP, (E, F, D), lambda x=experts: x.get(1), i)
        add(T.FFN_DOWN_EXP, (E, D, F), lambda x=experts: x.get(2), i)
        if f.shared is not None:
            linear(T.FFN_GATE_SHEXP, f.shared.gate, i)
            linear(T.FFN_UP_SHEXP, f.shared.up, i)
            linear(T.FFN_DOWN_SHEXP, f.shared.down, i)
        if f.shared_gate is not None:
            param(T.FFN_GATE_INP_SHEXP, f.shared_gate.weight, i, make=lambda g=f.shared_gate: _weight(g).view(-1))
    param(T.OUTPUT_NORM, model.norm.weight)
    if model.head is not None:
        linear(T.OUTPUT, model.head, None)
    return out


# --- metadata ----------------------------------------------------------------------------------------------------


def _hparams(writer, gguf, config: ModelConfig, arch: str, model_type: str, file_type: str) -> None:
    moe, attn = config.moe, config.attention
    writer.add_name(config.name)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(attn.rope_theta)
    writer.add_expert_count(moe.n_routed_experts)
    writer.add_expert_used_count(moe.top_k)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "BF16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[file_type])
    if arch == "deepseek2":  # as llama.cpp's DeepseekV2Model writes it: MLA as MQA over the latent
        writer.add_feed_forward_length(config.ffn_dim)
        writer.add_head_count(attn.n_heads)
        writer.add_head_count_kv(1)
        writer.add_leading_dense_block_count(config.layout.first_k_dense)
        writer.add_q_lora_rank(attn.q_lora_rank or 0)
        writer.add_kv_lora_rank(attn.kv_lora_rank)
        writer.add_key_length(attn.kv_lora_rank + attn.qk_rope_head_dim)
        writer.add_value_length(attn.kv_lora_rank)
        writer.add_key_length_mla(attn.qk_nope_head_dim + attn.qk_rope_head_dim)
        writer.add_value_length_mla(attn.v_head_dim)
        writer.add_rope_dimension_count(attn.qk_rope_head_dim)
        writer.add_expert_feed_forward_length(moe.expert_dim)
        writer.add_expert_shared_count(moe.n_shared_experts)
        writer.add_expert_weights_scale(moe.routed_scaling_factor)
        writer.add_expert_weights_norm(moe.norm_topk_prob)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if moe.score_func == "sigmoid"
                                      else gguf.ExpertGatingFuncType.SOFTMAX)
        if moe.n_group > 1:
            writer.add_expert_group_count(moe.n_group)
            writer.add_expert_group_used_count(moe.topk_group)
        scaling = attn.rope_scaling
        if scaling is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(scaling.factor)
            writer.add_rope_scaling_orig_ctx_len(scaling.original_max_seq_len)
            writer.add_rope_scaling_yarn_beta_fast(scaling.beta_fast)
            writer.add_rope_scaling_yarn_beta_slow(scaling.beta_slow)
            writer.add_rope_scaling_yarn_log_mul(0.1 * scaling.mscale_all_dim)  # llama.cpp divides it by 0.1
        return
    head_dim = attn.resolved_head_dim(config.dim)
    writer.add_head_count(attn.n_heads)
    writer.add_head_count_kv(attn.n_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * attn.n_heads != config.dim or arch == "qwen3moe":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":  # Mixtral: the experts' width is the FFN's
        writer.add_feed_forward_length(moe.expert_dim)
        return
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_expert_feed_forward_length(moe.expert_dim)
    if moe.n_shared_experts:
        writer.add_expert_shared_feed_forward_length(moe.n_shared_experts * moe.resolved_shared_expert_dim)


def _vocabulary(writer, gguf, config: ModelConfig, tokenizer_json: str | None) -> None:
    """The model's byte-level BPE (tokenizer.json) as llama.cpp's ``gpt2`` vocabulary, else a placeholder one."""
    V = config.vocab_size
    if tokenizer_json is not None:
        spec = json.loads(tokenizer_json)
        model = spec.get("model") or {}
        if model.get("type") == "BPE":
            tokens = [f"[PAD{i}]" for i in range(V)]
            types = [gguf.TokenType.UNUSED] * V
            for token, i in model["vocab"].items():
                if i < V:
                    tokens[i], types[i] = token, gguf.TokenType.NORMAL
            for added in spec.get("added_tokens", []):
                if added["id"] < V:
                    tokens[added["id"]] = added["content"]
                    types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else \
                        gguf.TokenType.USER_DEFINED
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges or ["a b"])  # llama.cpp wants the key even when nothing merges
            eos = next((a["id"] for a in spec.get("added_tokens", []) if a.get("special")), None)
            if eos is not None:
                writer.add_bos_token_id(eos)
                writer.add_eos_token_id(eos)
            return
    # SentencePiece's layout (unknown, bos, eos, 256 byte tokens, then ordinary ones): what llama.cpp needs to load.
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    if V < len(special):
        raise ValueError(f"vocab_size: a GGUF file without a tokenizer.json gets a placeholder vocabulary of at least "
                         f"{len(special)} tokens (llama.cpp's byte tokens); this model has {V}")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(special + [f"t{i}" for i in range(V - len(special))])
    writer.add_token_scores([0.0] * V)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (V - len(special)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
