import base64
import json
import re
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from smoe import presets
from smoe.eval import analysis
from smoe.eval.compare import run_suite
from smoe.eval.suite import SUITES, Arch, CompareSettings, Suite, check_matched, read_rows, resolve_suite
from smoe.models import build_model
from smoe.train.config import DataConfig, TrainConfig

TINY = {"dim": 32, "n_layers": 2, "vocab_size": 300, "attention.n_heads": 2, "attention.n_kv_heads": 2,
        "max_seq_len": 64}


def test_every_builtin_suite_is_matched_within_two_percent_without_embeddings():
    for name, suite in SUITES.items():
        table = check_matched(suite.archs, seq_len=256, matching=suite.matching)
        assert all(abs(r["matched_vs_reference"]) <= 0.02 for r in table.values() if r["matched"]), name


def test_table_1_matches_total_parameters_as_deepseekmoe_does():
    suite = SUITES["table-1"]
    table = check_matched(suite.archs, seq_len=256, matching=suite.matching)
    assert suite.matching == "total" and not table["dense"]["matched"]
    moe = {k: v for k, v in table.items() if v["moe"]}
    assert set(moe) == {"hash", "switch", "gshard", "deepseekmoe"}
    assert all(abs(v["matched_vs_reference"]) <= 0.02 for v in moe.values())
    # activated parameters differ and are shown: one FFN-equivalent for hash/switch (the dense model's), two for
    # gshard/deepseekmoe: one dense FFN (4 layers of 3 x 256 x 1024) more
    active = {k: v["active_non_embedding"] for k, v in table.items()}
    assert active["hash"] == pytest.approx(active["dense"], rel=0.02) == active["switch"]
    assert active["gshard"] - active["dense"] == pytest.approx(4 * 3 * 256 * 1024, rel=0.02)
    assert active["deepseekmoe"] == pytest.approx(active["gshard"], rel=0.02)


def test_matching_excludes_the_embeddings(tmp_path):
    # The same FFN width on a vocabulary 4x larger: equal non-embedding parameters, far from equal in total.
    archs = [Arch("small-vocab", "dense"), Arch("big-vocab", "dense", {"vocab_size": 32768})]
    table = check_matched(archs, seq_len=64)
    assert table["big-vocab"]["matched_vs_reference"] == 0 and table["big-vocab"]["active_vs_first"] > 0.5
    wider = [Arch("ffn-1024", "dense"), Arch("ffn-1088", "dense", {"ffn_dim": 1088})]  # +6% FFN, +~3% non-embedding
    with pytest.raises(ValueError, match=r"'ffn-1088': .* active non-embedding parameters, \+.*% from 'ffn-1024' "
                                         r".* must match within 2%"):
        check_matched(wider, seq_len=64)


def test_unmatched_architectures_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"'deepseek-v3-tiny': .* active non-embedding parameters, .* must match "
                                         r"within 2%"):
        run_suite(None, "dense,deepseek-v3-tiny", CompareSettings(train=TrainConfig(steps=1)), tmp_path)
    assert not (tmp_path / "suite.json").exists()


def test_unknown_suite_and_preset_are_named():
    with pytest.raises(ValueError, match="unknown suite 'mixtral'; known: seeds-debate"):
        resolve_suite("mixtral", None)
    with pytest.raises(ValueError, match="unknown preset 'dense2'"):
        check_matched(resolve_suite(None, "dense,dense2")[1].archs, 64)


# --- analyses ----------------------------------------------------------------------------------------------------


def test_consecutive_rates_on_a_known_trace():
    trace = torch.tensor([[[0, 1], [0, 2], [3, 2], [3, 1]]])  # first choices 0,0,3,3; overlaps all
    rates = analysis.consecutive_rates(trace, n_experts=4)
    assert rates["first"] == pytest.approx(2 / 3) and rates["any"] == 1.0
    assert rates["first_uniform"] == 0.25 and rates["first_load_weighted"] == pytest.approx(0.5)
    assert rates["any_uniform"] == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2) of pairs share nothing


def test_saturation_counts_shared_choices():
    final = torch.tensor([[[0, 1], [2, 3]]])
    assert analysis.saturation(final, final) == 1.0
    assert analysis.saturation(torch.tensor([[[1, 5], [6, 7]]]), final) == pytest.approx(0.25)


def test_domain_affinity_is_one_without_preference():
    trace = torch.tensor([[[0]], [[1]], [[0]], [[1]]])
    aff = analysis.domain_affinity(trace, [0, 0, 1, 1], n_sources=2, n_experts=2)
    np.testing.assert_allclose(aff, np.ones((2, 2)))


def test_knock_out_changes_routing_only_inside_the_block():
    torch.manual_seed(0)
    model = build_model(presets.get("deepseekmoe", **TINY)).eval()
    batch = [(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)))]
    before, loss = analysis.trace_routing(model, batch)
    with analysis.knock_out(model, routed={0: [0, 1, 2]}, shared=True):
        during, knocked = analysis.trace_routing(model, batch)
        assert not torch.isin(during[0], torch.tensor([0, 1, 2])).any()
    after, again = analysis.trace_routing(model, batch)
    assert torch.equal(before[0], after[0]) and again == loss and knocked != loss


# --- a whole suite, end to end -----------------------------------------------------------------------------------


class _Strict(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_suite_trains_resumes_and_renders_a_self_contained_report(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = "a red fox ran to the big tree and saw one small bird sing".split()
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(" ".join(rng.choice(words, 60)) for _ in range(40)))
    (tmp_path / "b.txt").write_text("<|endoftext|>".join(" ".join(rng.choice(words[::-1], 60)) for _ in range(40)))
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    # a dense FFN of 35 against 8 experts of 16, top-2, and their router: the same activated parameters
    monkeypatch.setitem(SUITES, "test-suite", Suite([Arch("dense", "dense", {**TINY, "ffn_dim": 35}),  # + the router's 8 x 32
                                                     Arch("moe", "mixtral-style", {**TINY, "moe.expert_dim": 16})]))
    settings = CompareSettings(train=TrainConfig(steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=2,
                                                 precision="fp32"),
                               data=DataConfig(data=f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"), seeds=2,
                               checkpoints=2)
    out = tmp_path / "suite"
    report = run_suite("test-suite", None, settings, out, log=lambda m: None, jobs=2)

    parser = _Strict()
    parser.feed(report.read_text())
    assert not parser.stack
    assert len(parser.images) >= 5
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| dense |" in md and "| moe |" in md and "seed noise" in md
    for name in ("curves.png", "balance.png", "knockout.png", "affinity.png", "saturation.png"):
        assert (out / "plots" / name).is_file(), name
    analyses = json.loads((out / "analysis.json").read_text())
    assert "domain_affinity" in analyses["moe"]["layers"]["0"] and "saturation" in analyses["moe"]

    # rerunning skips finished runs; a different definition in the same directory is refused
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/summary.json")}
    run_suite("test-suite", None, settings, out, log=lambda m: None)
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/summary.json")}
    with pytest.raises(ValueError, match="holds a suite with a different definition"):
        run_suite("test-suite", None, replace(settings, train=replace(settings.train, lr=1e-3)), out)


# --- reading a run's files ---------------------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 2}\n\n{"kind": "train", "st')
    assert read_rows(tmp_path) == [{"kind": "eval", "step": 2}]


def test_a_bad_metrics_line_before_the_last_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 2}\n{"kind": "train", "st\n{"step": 4}\n')
    with pytest.raises(ValueError, match="^" + re.escape(f"{tmp_path / 'metrics.jsonl'}:2: not valid JSON")):
        read_rows(tmp_path)


def test_a_complete_last_metrics_line_that_is_not_json_is_not_taken_for_torn(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 2}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: expected an object"):
        read_rows(tmp_path)


def test_tune_lr_trains_each_rate_once_and_every_seed_at_the_best(tmp_path, monkeypatch):
    from smoe.eval import compare
    from smoe.eval.suite import read_learning_rates, run_dir, tune_dir

    rng = np.random.default_rng(0)
    words = "a red fox ran to the big tree and saw one small bird sing".split()
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(" ".join(rng.choice(words, 60)) for _ in range(40)))
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compare, "write_report", lambda out, *a, **k: out / "report.html")  # not under test here
    arch = Arch("moe", "mixtral-style", {**TINY, "moe.expert_dim": 16})
    monkeypatch.setitem(SUITES, "tune-suite",
                        Suite([arch, Arch("moe2", "mixtral-style", {**TINY, "moe.expert_dim": 16})]))
    settings = CompareSettings(train=TrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=0, eval_batches=2,
                                                 precision="fp32"),
                               data=DataConfig(data=str(tmp_path / "a.txt")), seeds=2, checkpoints=1,
                               tune_lr=(1e-5, 1e-2))
    out = tmp_path / "suite"
    compare.run_suite("tune-suite", None, settings, out, log=lambda m: None, jobs=2)

    table = read_learning_rates(out)["moe"]
    tried = {float(lr): loss for lr, loss in table["tried"].items()}
    assert set(tried) == {1e-5, 1e-2} and table["chosen"] == min(tried, key=tried.get) == 1e-2  # 3 steps at 1e-5
    for seed in (0, 1):
        saved = json.loads((run_dir(out, arch, seed) / "run.json").read_text())["train_config"]
        assert saved["lr"] == table["chosen"] and saved["seed"] == seed
    best = json.loads((tune_dir(out, arch, 1e-2) / "summary.json").read_text())
    seed0 = json.loads((run_dir(out, arch, 0) / "summary.json").read_text())
    assert seed0["final_eval"] == best["final_eval"]  # the tuning run is the seed-0 run, not trained twice
    assert seed0["checkpoint"].startswith(str(run_dir(out, arch, 0)))
