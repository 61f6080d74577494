"""Upcycling a dense model's weights into the MoE that smoe.upcycling.spec describes.

    model = smoe.upcycle(dense, method="split", experts=16, top_k=4)           # a Transformer -> a Transformer
    upcycle_checkpoint("path/to/llama", "models/moe", UpcycleSpec("copy", 8, 2))  # what `smoe upcycle` runs

Everything but the FFNs is copied. Each MoE layer takes its experts from the dense FFN of the same layer
(spec.py: copies, or groups of hidden units from smoe.upcycling.partition), and a new router: drawn from
N(0, init_std) as both Komatsuzaki et al. 2023 and LLaMA-MoE draw a fresh gate, except a split with every
expert active (top_k = experts), whose router starts at zero: only its weights matter there, and uniform
weights make the step-0 model the dense one. Noise (``noise`` > 0) is then added to each expert's copy.

Legend: F dense hidden units, D model dim, E routed experts, G groups, W units per group.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoe.interop.hf import load_hf_config, load_pretrained, read_tokenizer_json, save_model_checkpoint, stored_dtype
from smoe.io.checkpoint import load_config, resolve_checkpoint
from smoe.io.files import check_fresh_dir, read_json
from smoe.models import Transformer, empty_model
from smoe.moe import MoELayer
from smoe.upcycling.partition import balanced_clusters, random_groups
from smoe.upcycling.spec import UpcycleSpec


def upcycle(model: Transformer, *, method: str, experts: int, top_k: int, partition: str = "random", shared: int = 0,
            noise: float = 0.0, seed: int = 0) -> Transformer:
    """A new MoE Transformer upcycled from the dense ``model`` (left unchanged), in its dtype, device and mode;
    the arguments are UpcycleSpec's fields."""
    return upcycle_model(model, UpcycleSpec(method, experts, top_k, partition, shared, noise, seed))


@torch.no_grad()
def upcycle_model(model: Transformer, spec: UpcycleSpec) -> Transformer:
    config = spec.config(model.config)  # raises naming the field before any work
    weight = model.embed.weight
    out = empty_model(config, weight.dtype, weight.device)
    source, target = model.state_dict(), out.state_dict()
    for name, tensor in target.items():
        if name in source:  # every tensor outside the upcycled FFNs
            tensor.copy_(source[name])
    generator = torch.Generator().manual_seed(spec.seed)
    for i, block in enumerate(out.layers):
        if block.is_moe:
            dense = model.layers[i].ffn
            _fill(block.ffn, dense.gate.weight, dense.up.weight, dense.down.weight, spec, config.init_std, generator)
    return out.train(model.training)


def _fill(layer: MoELayer, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, spec: UpcycleSpec,
          init_std: float, generator: torch.Generator) -> None:
    n_units, E = gate_FD.shape[0], spec.experts
    if spec.method == "copy":
        groups_GW = torch.arange(n_units).expand(E, n_units)  # every expert takes every unit
    elif spec.partition == "random":
        groups_GW = random_groups(n_units, E + spec.shared, generator)
    else:
        groups_GW = balanced_clusters(gate_FD, E + spec.shared, generator)
    routed_EW = groups_GW[:E]
    noisy = _noise(spec.noise, generator)
    layer.experts.w_gate_up.copy_(torch.cat([noisy(gate_FD[routed_EW], gate_FD), noisy(up_FD[routed_EW], up_FD)], 1))
    layer.experts.w_down.copy_(noisy(down_DF[:, routed_EW].transpose(0, 1), down_DF))  # (D, E, W) -> (E, D, W)
    if layer.shared is not None:
        shared_S = groups_GW[E:].flatten()
        layer.shared.gate.weight.copy_(noisy(gate_FD[shared_S], gate_FD))
        layer.shared.up.weight.copy_(noisy(up_FD[shared_S], up_FD))
        # The gate vector starts at zero, so sigmoid gives 1/2: doubling the down projection keeps step 0 exact.
        layer.shared.down.weight.copy_(2 * noisy(down_DF[:, shared_S], down_DF))
        layer.shared_gate.weight.zero_()
    router = layer.router.weight
    if spec.method == "split" and spec.top_k == E:
        router.zero_()
    else:
        router.copy_(torch.randn(router.shape, generator=generator) * init_std)


def _noise(std: float, generator: torch.Generator):
    """``noisy(t, dense)``: ``t`` plus Gaussian noise of ``std`` times the dense matrix's own standard deviation."""
    def noisy(t: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        if std == 0:
            return t
        scale = std * dense.float().std()
        return t + (torch.randn(t.shape, generator=generator) * scale).to(device=t.device, dtype=t.dtype)
    return noisy


def upcycle_checkpoint(source: str | Path, out: str | Path, spec: UpcycleSpec) -> Path:
    """Upcycle a dense Hugging Face model directory of the Llama family (llama, mistral, qwen2) or a dense smoe
    checkpoint / run directory into a smoe model checkpoint at ``out`` (which must not exist or be empty; it
    appears only once complete), in the source's stored dtype, with its tokenizer.json. Every check runs on the
    configs before a weight is read."""
    source = Path(source)
    out = check_fresh_dir(out)
    spec.config(_source_config(source))
    model = load_pretrained(source, dtype=stored_dtype(source))
    return save_model_checkpoint(upcycle_model(model, spec), out, tokenizer_json=read_tokenizer_json(source))


def _source_config(path: Path):
    """The model config of what load_pretrained reads at ``path``, without reading its weights."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory, checkpoint or run directory")
    hf = path / "config.json"
    if hf.is_file() and "model_type" in read_json(hf):
        return load_hf_config(path)
    return load_config(resolve_checkpoint(path))
