"""Upcycling a dense model into an MoE: exact where the method is exact (copy with renormalised gates; split with
every expert active), partitions that are partitions, the Llama family from transformers through `smoe upcycle`
to a checkpoint that loads, exports and continues training, and every refusal before any weight is read."""

import json
import warnings
from dataclasses import replace

import pytest
import torch

import smoe
from smoe import presets
from smoe.cli import main
from smoe.interop.hf import save_pretrained
from smoe.models import build_model
from smoe.upcycling.partition import balanced_clusters, random_groups
from smoe.upcycling.spec import UpcycleSpec
from smoe.upcycling.weights import upcycle_checkpoint

SMALL = {"dim": 64, "n_layers": 2, "ffn_dim": 192, "vocab_size": 300, "attention.n_heads": 4,
         "attention.n_kv_heads": 2, "max_seq_len": 64}
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = build_model(presets.get("dense", **SMALL)).eval()
    with torch.no_grad():  # FFNs that matter: at init_std 0.02 the residual stream would hide a wrong expert
        for block in model.layers:
            for w in (block.ffn.gate.weight, block.ffn.up.weight, block.ffn.down.weight):
                w.normal_(0, 0.2)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("kw", [
    dict(method="copy", experts=4, top_k=2),
    dict(method="copy", experts=8, top_k=3),
    dict(method="split", experts=4, top_k=4),
    dict(method="split", experts=6, top_k=6, partition="clustering"),
    dict(method="split", experts=4, top_k=4, shared=2),  # Qwen1.5-MoE's routed + gated shared experts
])
def test_upcycled_model_computes_the_dense_model_at_step_0(dense, kw):
    moe = smoe.upcycle(dense, **kw)
    assert moe.config.moe.n_routed_experts == kw["experts"] and len(moe.moe_layers) == 2
    torch.testing.assert_close(_logits(moe), _logits(dense), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_split_below_every_expert_weights_each_chosen_group_by_experts_times_its_gate(dense):
    """At top_k < E a token gets the dense FFN restricted to its chosen groups of hidden units, each scaled by
    E times its renormalised gate (E/K on average: LLaMA-MoE's compensation for the groups left out)."""
    layer, ffn = smoe.upcycle(dense, method="split", experts=4, top_k=2, seed=5).layers[0].ffn, dense.layers[0].ffn
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    routing = layer.router(x)
    assert torch.allclose(routing.weights_A.view(10, 2).sum(1), torch.full((10,), 4.0))
    units = [torch.cdist(layer.experts.w_gate_up[e, :48], ffn.gate.weight).argmin(1) for e in range(4)]
    assert torch.equal(torch.cat(units).sort().values, torch.arange(192))  # the four groups partition the units
    scale = torch.zeros(10, 192)
    for t, e, w in zip(routing.token_ids_A.tolist(), routing.expert_ids_A.tolist(), routing.weights_A, strict=True):
        scale[t, units[e]] = w
    want = ffn.down(torch.nn.functional.silu(ffn.gate(x)) * ffn.up(x) * scale)
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-4, atol=1e-5)


def test_noise_separates_the_copies_and_leaves_the_rest(dense):
    moe = smoe.upcycle(dense, method="copy", experts=4, top_k=2, noise=0.1, seed=3)
    w = moe.layers[0].ffn.experts.w_gate_up
    assert not torch.equal(w[0], w[1])
    relative = (w[0, :192] - dense.layers[0].ffn.gate.weight).std() / dense.layers[0].ffn.gate.weight.std()
    assert 0.05 < relative < 0.2
    assert torch.equal(moe.layers[0].attn.wq.weight, dense.layers[0].attn.wq.weight)
    assert not torch.allclose(_logits(moe), _logits(dense), atol=1e-5)


def test_the_same_seed_gives_the_same_model_and_the_source_is_untouched(dense):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    a, b = (smoe.upcycle(dense, method="split", experts=4, top_k=2, seed=7) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


@pytest.mark.parametrize("groups", [lambda g: random_groups(48, 4, g),
                                    lambda g: balanced_clusters(torch.randn(48, 8, generator=g), 4, g)])
def test_partitions_cover_every_unit_once_in_equal_groups(groups):
    groups_GW = groups(torch.Generator().manual_seed(0))
    assert groups_GW.shape == (4, 12)
    assert torch.equal(groups_GW.flatten().sort().values, torch.arange(48))


def test_clustering_recovers_planted_groups_of_alike_units():
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 16, generator=g)
    truth = torch.randperm(64, generator=g) % 4  # 16 units around each direction, in a shuffled order
    rows = directions[truth] + 0.05 * torch.randn(64, 16, generator=g)
    found = balanced_clusters(rows, 4, torch.Generator().manual_seed(1))
    assert sorted(sorted(truth[found[k]].tolist()) for k in range(4)) == [[k] * 16 for k in range(4)]


@pytest.mark.parametrize("kw, match", [
    (dict(method="copy", experts=4, top_k=1), r"top_k: must be at least 2"),
    (dict(method="copy", experts=4, top_k=5), r"top_k: must not exceed experts \(4\)"),
    (dict(method="copy", experts=4, top_k=2, shared=1), r"shared: applies to method 'split' only"),
    (dict(method="copy", experts=4, top_k=2, partition="clustering"), r"partition: applies to method 'split'"),
    (dict(method="split", experts=5, top_k=2), r"experts: the dense FFN's 192 hidden units do not split into 5 "
                                               r"routed \+ 0 shared groups"),
    (dict(method="merge", experts=4, top_k=2), r"method: must be of type 'copy' \| 'split', got 'merge'"),
])
def test_bad_specs_name_the_field(dense, kw, match):
    with pytest.raises(ValueError, match=match):
        smoe.upcycle(dense, **kw)


def test_upcycling_llama_2_7b_as_llama_moe_gives_the_llama_moe_preset_up_to_its_scale():
    from smoe.interop.hf_config import config_from_hf

    llama_2_7b = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # meta-llama/Llama-2-7b-hf
    ours = UpcycleSpec("split", 16, 4).config(config_from_hf(llama_2_7b))
    published = presets.get("llama-moe-3.5b")
    assert (ours.moe.routed_scaling_factor, published.moe.routed_scaling_factor) == (16.0, 4.0)  # spec.py: why
    assert replace(ours, name="", moe=replace(ours.moe, routed_scaling_factor=4.0)) == replace(published, name="")


def test_an_moe_source_is_refused():
    with pytest.raises(ValueError, match=r"already an MoE"):
        smoe.upcycle(build_model(presets.get("mixtral-tiny", n_layers=1)), method="copy", experts=4, top_k=2)


# --- through files: transformers' Llama -> `smoe upcycle` -> load, export, continue --------------------------------

transformers = pytest.importorskip("transformers")
from hf_helpers import hf_logits  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama that transformers builds and saves, and its logits."""
    path = tmp_path_factory.mktemp("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.normal_(0, 0.2)
        want = model(IDS).logits
    model.save_pretrained(path)
    return path, want


@pytest.mark.parametrize("args, family", [
    (["--method", "copy", "--experts", "4", "--top-k", "2"], "mixtral"),
    (["--method", "split", "--experts", "4", "--top-k", "4", "--partition", "clustering"], "mixtral"),
    (["--method", "split", "--experts", "4", "--top-k", "4", "--shared", "2"], "qwen2_moe"),
])
def test_smoe_upcycle_of_a_transformers_llama_loads_and_exports_with_its_logits(llama, tmp_path, capsys, args,
                                                                                family):
    path, want = llama
    assert main(["upcycle", str(path), "--out", str(tmp_path / "moe"), *args]) == 0
    assert "continue with `smoe train --init-from" in capsys.readouterr().out
    moe = smoe.load_pretrained(tmp_path / "moe")
    torch.testing.assert_close(_logits(moe), want, rtol=1e-4, atol=1e-5)
    assert main(["convert", str(tmp_path / "moe"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    # split's routed_scaling_factor, which these families lack, travels in the exported down projections
    torch.testing.assert_close(hf_logits(tmp_path / "hf", IDS), want, rtol=1e-4, atol=1e-5)


def test_scaled_experts_export_with_the_same_logits_at_top_k_below_experts(llama, tmp_path):
    moe = smoe.upcycle(smoe.load_pretrained(llama[0]), method="split", experts=4, top_k=2, seed=1)
    assert moe.config.moe.routed_scaling_factor == 4.0
    save_pretrained(moe, tmp_path / "hf")
    torch.testing.assert_close(hf_logits(tmp_path / "hf", IDS), _logits(moe), rtol=1e-4, atol=1e-5)


def test_refusals_come_before_any_weight_is_read_and_leave_out_untouched(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("smoe.upcycling.weights.load_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    for args, match in [
        (["--out", str(tmp_path / "full"), "--method", "copy", "--experts", "4", "--top-k", "2"],
         "exists and is not empty"),
        (["--out", str(tmp_path / "o"), "--method", "split", "--experts", "5", "--top-k", "2"],
         "--experts: the dense FFN's 192 hidden units do not split"),
        (["--out", str(tmp_path / "o"), "--method", "copy", "--experts", "4", "--top-k", "1"],
         "--top-k: must be at least 2"),
    ]:
        assert main(["upcycle", str(llama[0]), *args]) == 2
        assert match in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"] and not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        upcycle_checkpoint(tmp_path / "nowhere", tmp_path / "o", UpcycleSpec("copy", 4, 2))


def test_an_upcycled_run_continues_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("<|endoftext|>".join(f"the fox {i} found a red ball and played in the sun" * 8 for i in range(40)))
    common = ["--data", str(text), "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--quiet"]
    assert main(["train", "--preset", "dense", *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")],
                 "--steps", "2", "--out", str(tmp_path / "dense"), *common]) == 0
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--method", "split",
                 "--experts", "4", "--top-k", "2"]) == 0
    assert (tmp_path / "moe" / "tokenizer.json").read_text() == (tmp_path / "dense" / "checkpoints" /
                                                                  "step_00000002" / "tokenizer.json").read_text()
    assert main(["train", "--init-from", str(tmp_path / "moe"), "--steps", "2", "--start-step", "2",
                 "--out", str(tmp_path / "cont"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2] and "0" in rows[0]["router"]
