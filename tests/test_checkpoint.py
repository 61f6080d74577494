import json
import random

import numpy as np
import pytest
import torch

from smoe.config import AttentionConfig, ModelConfig, MoEConfig
from smoe.io import checkpoint as layout
from smoe.models import build_model
from smoe.train import checkpoint as ckpt
from smoe.train.optim import build_optimizer


def _config():
    return ModelConfig(vocab_size=32, dim=16, n_layers=1, ffn_dim=32,
                       attention=AttentionConfig(n_heads=2, n_kv_heads=2),
                       moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8, score_func="sigmoid",
                                     balance="aux_free"))


def _trained(seed=0):
    torch.manual_seed(seed)
    model = build_model(_config())
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    ids = torch.randint(0, 32, (2, 9))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    opt.step()
    model.update_expert_biases({i: s.load for i, s in out.router_stats.items()})
    return model, opt


def test_round_trip_restores_weights_buffers_optimizer_and_rng(tmp_path):
    model, opt = _trained()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, _config(), {"skipped_steps": 1}, tokenizer_json="{}")
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))

    fresh, fresh_opt = _trained(seed=1)
    layout.load_model_state(path, fresh)
    state = ckpt.load_training_state(path, fresh_opt)
    assert state["step"] == 7 and state["skipped_steps"] == 1
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert fresh.layers[0].ffn.router.expert_bias.abs().sum() > 0
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        a, b = opt.state[p], fresh_opt.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert layout.load_config(path) == _config()
    assert (path / "tokenizer.json").read_text() == "{}"


def test_incomplete_checkpoints_are_ignored_and_removed(tmp_path):
    model, opt = _trained()
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, _config(), {})
    torn = tmp_path / "checkpoints" / ".tmp-step_00000002-999"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    missing_file = tmp_path / "checkpoints" / "step_00000003"
    missing_file.mkdir()
    assert layout.latest_checkpoint(tmp_path).path == good
    layout.remove_incomplete(tmp_path)
    assert not torn.exists()


def test_keep_last_prunes_oldest(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, _config(), {}, keep_last=2)
    assert [c.step for c in layout.list_checkpoints(tmp_path)] == [3, 4]


def test_resolve_checkpoint_accepts_run_dir_and_names_bad_paths(tmp_path):
    model, opt = _trained()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, _config(), {})
    assert layout.resolve_checkpoint(tmp_path) == path
    with pytest.raises(FileNotFoundError, match="no-such"):
        layout.resolve_checkpoint(tmp_path / "no-such")
    with pytest.raises(ValueError, match="not a checkpoint"):
        layout.resolve_checkpoint(tmp_path / "checkpoints")


def test_shape_mismatch_names_file_and_key(tmp_path):
    model, opt = _trained()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, _config(), {})
    other = build_model(ModelConfig(**{**_config().__dict__, "dim": 32}))
    with pytest.raises(ValueError, match=r"model\.safetensors: embed\.weight has shape"):
        layout.load_model_state(path, other)


def test_state_json_is_plain_json(tmp_path):
    model, opt = _trained()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, _config(), {"skipped_steps": 0})
    state = json.loads((path / "state.json").read_text())
    assert {"step", "optimizer", "rng", "skipped_steps"} <= state.keys()


def test_a_failed_atomic_directory_leaves_nothing_not_even_its_parents(tmp_path):
    from smoe.io.files import atomic_directory

    with pytest.raises(RuntimeError, match="midway"), atomic_directory(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("midway")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "a" / "b" / "out") as tmp:  # a success keeps them
        (tmp / "whole.json").write_text("{}")
    assert (tmp_path / "a" / "b" / "out" / "whole.json").is_file()
