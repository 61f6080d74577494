import base64
import json
import re
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from smoe import presets
from smoe.eval import analysis, collect, plots, report, routing_stats
from smoe.eval.compare import run_suite
from smoe.eval.layout import read_learning_rates, read_rows, run_dir, tune_dir
from smoe.eval.settings import TUNE_SEED, CompareSettings
from smoe.eval.suite import Arch, Contrast, Suite, check_design, routed_gate_sum
from smoe.eval.suites import SUITES, resolve_suite
from smoe.eval.verdict import judge
from smoe.models import build_model
from smoe.train.config import DataConfig, TrainConfig

TINY = {"dim": 32, "n_layers": 2, "vocab_size": 300, "attention.n_heads": 2, "attention.n_kv_heads": 2,
        "max_seq_len": 64}


def _suite(archs, contrasts=None, **kw):
    """A suite whose contrasts default to every architecture against the first."""
    contrasts = contrasts or tuple(Contrast(a.label, archs[0].label, "active", "test") for a in archs[1:4])
    return Suite(archs, contrasts=contrasts, **kw)


# --- the design ---------------------------------------------------------------------------------------------------


def test_every_builtin_suite_is_matched_with_valid_contrasts_and_ladder():
    for name, suite in SUITES.items():
        table = check_design(suite, seq_len=128)  # raises on a bad contrast, matching or ladder
        assert all(abs(r["matched_vs_reference"]) <= 0.02 for r in table.values() if r["matched"]), name
        assert 1 <= len(suite.contrasts) <= 3 and suite.seeds >= (4 if name == "demo" else 12), name
        if suite.ladder:
            rungs = [r["flops_per_token"] for r in table.values() if not r["moe"] and r.get("ladder", True)
                     and r.get("matched") is not None]
            assert len(rungs) >= 4 and max(rungs) / min(rungs) >= 4, name


def test_every_suite_with_a_ladder_shares_the_same_rungs():
    widths = {name: sorted(a.config().ffn_dim for a in s.runs() if a.config().moe is None)
              for name, s in SUITES.items() if s.ladder}
    assert len({tuple(w) for w in widths.values()}) == 1 and widths["seeds-debate"] == [128, 256, 512, 1024, 2048]


def test_table_1_matches_total_parameters_as_deepseekmoe_does():
    suite = SUITES["table-1"]
    table = check_design(suite, seq_len=128)
    assert suite.matching == "total" and not table["dense"]["matched"]
    moe = {k: v for k, v in table.items() if v["moe"]}
    assert set(moe) == {"hash", "switch", "gshard", "deepseekmoe"}
    assert all(abs(v["matched_vs_reference"]) <= 0.02 for v in moe.values())
    # activated parameters differ and are shown: one FFN-equivalent for hash/switch (the dense model's), two for
    # gshard/deepseekmoe: one dense FFN (4 layers of 3 x 128 x 512) more
    active = {k: v["active_non_embedding"] for k, v in table.items()}
    assert active["hash"] == pytest.approx(active["dense"], rel=0.02) == active["switch"]
    assert active["gshard"] - active["dense"] == pytest.approx(4 * 3 * 128 * 512, rel=0.02)
    assert active["deepseekmoe"] == pytest.approx(active["gshard"], rel=0.02)
    assert [c.name for c in suite.contrasts] == ["deepseekmoe − gshard", "gshard − switch", "switch − hash"]


def test_seeds_debate_total_holds_the_seeds_pair_at_table_1s_budget():
    suite = SUITES["seeds-debate-total"]
    table = check_design(suite, seq_len=128)
    total_1 = check_design(SUITES["table-1"], seq_len=128)
    assert table["deepseekmoe"]["total_non_embedding"] == total_1["deepseekmoe"]["total_non_embedding"]
    ffn = 4 * 3 * 128 * 512  # one dense FFN in every layer
    active = {k: v["active_non_embedding"] for k, v in table.items()}
    assert active["mixtral-style"] - active["dense"] == pytest.approx(3 * ffn, rel=0.02)  # 2 experts of 2 FFNs
    assert [(c.a, c.b, c.matching) for c in suite.contrasts] == [("deepseekmoe", "mixtral-style", "total")]


def test_matching_excludes_the_embeddings():
    # The same FFN width on a vocabulary 8x larger: equal non-embedding parameters, far from equal in total.
    archs = [Arch("small-vocab", "dense"), Arch("big-vocab", "dense", {"vocab_size": 32768})]
    table = check_design(_suite(archs), seq_len=64)
    assert table["big-vocab"]["matched_vs_reference"] == 0 and table["big-vocab"]["active_vs_first"] > 0.5
    wider = [Arch("ffn-512", "dense"), Arch("ffn-560", "dense", {"ffn_dim": 560})]  # +9% FFN, +~5% non-embedding
    with pytest.raises(ValueError, match=r"'ffn-560': .* active non-embedding parameters, \+.*% from 'ffn-512' "
                                         r".* must match within 2%"):
        check_design(_suite(wider), seq_len=64)


def test_a_contrast_must_name_the_suites_architectures_and_be_matched_as_it_says():
    archs = [Arch("dense", "dense"), Arch("gshard", "gshard"), Arch("big", "gshard", {"moe.expert_dim": 512})]
    with pytest.raises(ValueError, match=r"contrast gshard − switch: no architecture 'switch' in the suite"):
        check_design(Suite(archs[:2], contrasts=(Contrast("gshard", "switch", "active", "x"),)), 64)
    total = Suite([archs[0], archs[2], Arch("switch", "switch")], matching="total",
                  contrasts=(Contrast("big", "dense", "total", "x"),))
    with pytest.raises(ValueError, match=r"contrast big − dense: matched on total parameters, but 'big' has \+"):
        check_design(total, 64)
    with pytest.raises(ValueError, match=r"contrasts: a suite pre-registers 1 to 3, got 0"):
        check_design(Suite(archs[:2]), 64)
    four = tuple(Contrast("gshard", "dense", "active", str(i)) for i in range(4))
    with pytest.raises(ValueError, match=r"got 4"):
        check_design(Suite(archs[:2], contrasts=four), 64)


def test_a_ladder_needs_four_rungs_over_four_times_the_compute():
    archs = [Arch("dense", "dense"), Arch("gshard", "gshard")]
    short = [Arch(f"dense-{w}", "dense", {"ffn_dim": w}) for w in (1024, 2048)]
    with pytest.raises(ValueError, match=r"ladder: 3 dense rungs spanning .*x .* needs at least 4 spanning 4x"):
        check_design(_suite(archs, ladder=short), 128)


def test_custom_comparisons_preregister_each_preset_against_the_first_or_the_named_pairs():
    _, suite = resolve_suite(None, "dense,gshard,switch")
    assert [c.name for c in suite.contrasts] == ["gshard − dense", "switch − dense"]
    _, suite = resolve_suite(None, "dense,gshard,switch", "switch:gshard")
    assert [c.name for c in suite.contrasts] == ["switch − gshard"]
    with pytest.raises(ValueError, match=r"contrasts: 5 presets give 4 comparisons with the first; name at most 3"):
        resolve_suite(None, "dense,gshard,switch,mixtral-style,deepseekmoe")
    with pytest.raises(ValueError, match=r"contrasts 'gshard': expected A:B"):
        resolve_suite(None, "dense,gshard", "gshard")
    with pytest.raises(ValueError, match=r"contrasts: suite 'seeds-debate' pre-registers its own"):
        resolve_suite("seeds-debate", None, "a:b")


def test_unmatched_architectures_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"'deepseek-v3-tiny': .* active non-embedding parameters, .* must match "
                                         r"within 2%"):
        run_suite(None, "dense,deepseek-v3-tiny", CompareSettings(train=TrainConfig(steps=1)), tmp_path)
    assert not (tmp_path / "suite.json").exists()


def test_unknown_suite_and_preset_are_named():
    with pytest.raises(ValueError, match="unknown suite 'mixtral'; known: seeds-debate"):
        resolve_suite("mixtral", None)
    with pytest.raises(ValueError, match="unknown preset 'dense2'"):
        check_design(resolve_suite(None, "dense,dense2")[1], 64)


def test_the_routed_gate_sum_at_init_is_one_for_renormalised_routers_and_about_k_over_e_otherwise():
    assert routed_gate_sum(presets.get("dense")) is None
    assert routed_gate_sum(presets.get("mixtral-style")) == pytest.approx(1.0)
    assert routed_gate_sum(presets.get("deepseek-v3-style")) == pytest.approx(1.0)  # sigmoid, renormalised
    # unnormalised softmax top-6 of 64 near-uniform scores: a little above k/E (the top 6 of 64), far below 1
    unnormalised = routed_gate_sum(presets.get("deepseekmoe"))
    assert 6 / 64 < unnormalised < 0.2
    scaled = presets.get("deepseekmoe", **{"moe.routed_scaling_factor": 1 / unnormalised})
    assert routed_gate_sum(scaled) == pytest.approx(1.0)
    assert routed_gate_sum(presets.get("switch", **{"moe.routing": "hash", "moe.balance": "none"})) == 1.0


def test_runs_checkpoint_early_only_where_router_saturation_is_analysed():
    settings = CompareSettings(train=TrainConfig(steps=300, batch_size=16, seq_len=128, eval_batches=4),
                               checkpoints=4)
    cfg = settings.run_config(seed=1)
    assert (cfg.save_every, cfg.save_at, cfg.keep_last, cfg.keep_optimizer) == (75, (3, 30), 7, 1)
    assert settings.run_config(seed=1, moe=False).save_at == ()
    # the final evaluation covers the fixed validation set: 65,536 tokens are 32 batches of 16 x 128
    assert (cfg.eval_batches, cfg.final_eval_batches) == (4, 32)
    # an early step that is already a regular checkpoint is not listed twice
    assert CompareSettings(train=TrainConfig(steps=10), checkpoints=10).run_config(seed=0).save_at == ()


def test_every_run_reads_the_suites_tokenizer_and_one_held_out_split():
    data = CompareSettings().run_data("/x/tokenizer.json")
    assert (data.tokenizer, data.split_seed, data.val_fraction) == ("/x/tokenizer.json", 0, 0.05)
    with pytest.raises(ValueError, match="split_seed: is the suite's to fix"):
        CompareSettings(data=DataConfig(split_seed=3)).validate()


# --- analyses ----------------------------------------------------------------------------------------------------


def test_consecutive_rates_on_a_known_trace():
    trace = torch.tensor([[[0, 1], [0, 2], [3, 2], [3, 1]]])  # first choices 0,0,3,3; overlaps all
    rates = routing_stats.consecutive_rates(trace, n_experts=4)
    assert rates["first"] == pytest.approx(2 / 3) and rates["any"] == 1.0
    assert rates["first_uniform"] == 0.25 and rates["first_load_weighted"] == pytest.approx(0.5)
    assert rates["any_uniform"] == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2) of pairs share nothing


def test_saturation_counts_shared_choices():
    final = torch.tensor([[[0, 1], [2, 3]]])
    assert routing_stats.saturation(final, final) == 1.0
    assert routing_stats.saturation(torch.tensor([[[1, 5], [6, 7]]]), final) == pytest.approx(0.25)


def test_domain_affinity_is_one_without_preference():
    trace = torch.tensor([[[0]], [[1]], [[0]], [[1]]])
    aff = routing_stats.domain_affinity(trace, [0, 0, 1, 1], n_sources=2, n_experts=2)
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


def _corpus(tmp_path, docs=120):
    rng = np.random.default_rng(0)
    words = "a red fox ran to the big tree and saw one small bird sing".split()
    for name, vocab in (("a", words), ("b", words[::-1])):
        (tmp_path / f"{name}.txt").write_text("<|endoftext|>".join(" ".join(rng.choice(vocab, 60))
                                                                   for _ in range(docs)))
    return f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"


# A dense FFN of 35 against 8 experts of 16, top-2, and their router: the same activated parameters (8 x 32); dense
# models of other widths are the ladder (5 rungs over 6.8x the FLOPs per token).
TEST_SUITE = Suite([Arch("dense", "dense", {**TINY, "ffn_dim": 35}),
                    Arch("moe", "mixtral-style", {**TINY, "moe.expert_dim": 16})],
                   contrasts=(Contrast("moe", "dense", "active", "a test"),),
                   ladder=[Arch(f"dense-{w}", "dense", {**TINY, "ffn_dim": w}) for w in (8, 70, 280, 560)], seeds=2)
TEST_SETTINGS = CompareSettings(train=TrainConfig(steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=2,
                                                  precision="fp32"), checkpoints=2, val_tokens=256)


@pytest.mark.slow
def test_suite_trains_resumes_and_renders_a_self_contained_report(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(SUITES, "test-suite", TEST_SUITE)
    settings = replace(TEST_SETTINGS, data=DataConfig(data=_corpus(tmp_path)))
    out = tmp_path / "suite"
    report_file = run_suite("test-suite", None, settings, out, log=lambda m: None, jobs=2)

    parser = _Strict()
    parser.feed(report_file.read_text())
    assert not parser.stack
    assert len(parser.images) >= 5
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    # the power check comes first, then the verdict on the one pre-registered contrast
    assert md.index("## Power check") < md.index("## Verdict") < md.index("## Results")
    assert re.search(r"- moe − dense \(equal activated parameters; a test\): [+-]\d\.\d{3} nats, 95% CI \[.*\], "
                     r"(not )?resolved \(detectable at 2 seeds: ", md)
    assert "Dense ladder: 5 rungs spanning" in md and "| moe | " in md and "MFU" not in md  # no CPU peak
    # one tokenizer, trained once, and one validation set: every run.json records the same two hashes
    hashes = {(r["tokenizer_sha256"], r["validation_sha256"])
              for r in (json.loads(p.read_text()) for p in out.glob("runs/*/*/run.json"))}
    assert len(hashes) == 1 and len(list(out.glob("runs/*/*/run.json"))) == 12
    assert "Every run used one tokenizer" in md
    assert json.loads(next(out.glob("runs/*/*/run.json")).read_text())["data_config"]["split_seed"] == 0
    for name in ("curves.png", "balance.png", "knockout.png", "affinity.png", "saturation.png", "redundancy.png",
                 "ladder.png"):
        assert (out / "plots" / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    (contrast,) = summary["verdict"]["contrasts"]
    assert (contrast["a"], contrast["b"], contrast["matching"]) == ("moe", "dense", "active")
    assert len(contrast["diffs"]) == 2 and summary["power"]["span"] > 4 and summary["sample"]["text"]
    analyses = json.loads((out / "analysis.json").read_text())
    assert "domain_affinity" in analyses["moe"]["layers"]["0"] and "saturation" in analyses["moe"]
    assert set(analyses["moe"]["other_seeds"]) == {"1"} and analyses["moe"]["over_seeds"]["seeds"] == 2
    # dense runs keep no early checkpoints; MoE runs do, for the saturation analysis
    assert len(list((run_dir(out, TEST_SUITE.archs[0], 0) / "checkpoints").iterdir())) == 2
    assert len(list((run_dir(out, TEST_SUITE.archs[1], 0) / "checkpoints").iterdir())) == 3

    # rerunning skips finished runs; a different definition in the same directory is refused
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/summary.json")}
    run_suite("test-suite", None, settings, out, log=lambda m: None)
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/summary.json")}
    with pytest.raises(ValueError, match="holds a suite with a different definition"):
        run_suite("test-suite", None, replace(settings, train=replace(settings.train, lr=1e-3)), out)

    # another suite with the same runs links them instead of training them again
    logged = []
    monkeypatch.setitem(SUITES, "test-other", replace(TEST_SUITE, contrasts=(Contrast("dense", "moe", "active", "b"),)))
    run_suite("test-other", None, settings, tmp_path / "other", log=logged.append, reuse=(out,))
    assert sum("reused" in line for line in logged) == 12 and not any("training" in line for line in logged)
    linked = run_dir(tmp_path / "other", TEST_SUITE.archs[1], 1) / "summary.json"
    assert linked.stat().st_ino == (run_dir(out, TEST_SUITE.archs[1], 1) / "summary.json").stat().st_ino


def test_a_validation_split_smaller_than_val_tokens_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(SUITES, "test-suite", TEST_SUITE)
    settings = replace(TEST_SETTINGS, data=DataConfig(data=_corpus(tmp_path, docs=30)), val_tokens=100_000)
    with pytest.raises(ValueError, match=r"val_tokens 100000: the validation split holds \d+ sequences of 16 tokens"):
        run_suite("test-suite", None, settings, tmp_path / "suite", log=lambda m: None)
    assert not (tmp_path / "suite" / "runs").exists()


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


@pytest.mark.slow
def test_tune_lr_trains_each_rate_once_on_a_seed_no_contrast_uses(tmp_path, monkeypatch):
    from smoe.eval import compare

    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compare, "write_report", lambda out, *a, **k: out / "report.html")  # not under test here
    arch = Arch("moe", "mixtral-style", {**TINY, "moe.expert_dim": 16})
    monkeypatch.setitem(SUITES, "tune-suite", _suite([arch, Arch("moe2", "mixtral-style", arch.overrides)]))
    settings = replace(TEST_SETTINGS, train=replace(TEST_SETTINGS.train, steps=3, eval_every=0), seeds=2,
                       checkpoints=1, tune_lr=(1e-5, 1e-2), data=DataConfig(data=_corpus(tmp_path)))
    out = tmp_path / "suite"
    compare.run_suite("tune-suite", None, settings, out, log=lambda m: None, jobs=2)

    table = read_learning_rates(out)["moe"]
    tried = {float(lr): loss for lr, loss in table["tried"].items()}
    assert set(tried) == {1e-5, 1e-2} and table["chosen"] == min(tried, key=tried.get) == 1e-2  # 3 steps at 1e-5
    assert table["seed"] == TUNE_SEED
    assert json.loads((tune_dir(out, arch, 1e-2) / "run.json").read_text())["train_config"]["seed"] == TUNE_SEED
    for seed in (0, 1):
        saved = json.loads((run_dir(out, arch, seed) / "run.json").read_text())["train_config"]
        assert saved["lr"] == table["chosen"] and saved["seed"] == seed
    best = json.loads((tune_dir(out, arch, 1e-2) / "summary.json").read_text())
    seed0 = json.loads((run_dir(out, arch, 0) / "summary.json").read_text())
    assert seed0["final_eval"] != best["final_eval"]  # seed 0 is a run of its own, not the tuning run


# --- the report's document, from made-up runs (no training) ------------------------------------------------------


def _fake_runs(losses: dict[str, list[float]], precision="bf16"):
    """collect()'s data and the matched table for architectures with the given final losses, one per seed."""
    data, matched = {}, {}
    for label, per_seed in losses.items():
        data[label] = {"curves": [([1, 2], [x + 1.0, x]) for x in per_seed],
                       "final": [{"val_loss": x, "val_bpb": x / 3} for x in per_seed],
                       "summaries": [{"peak_device_bytes": 2**20, "peak_rss_bytes": 0, "tokens_per_s": 10.0}] *
                       len(per_seed),
                       "precision": [precision] * len(per_seed), "balance": [([1, 2], [0.0, 0.0])] * len(per_seed),
                       "loads": {}, "hashes": [{"tokenizer_sha256": "ab" * 32, "validation_sha256": "cd" * 32}]}
        matched[label] = {"total_params": 1e6, "active_params": 1e6, "active_vs_first": 0.0, "flops_per_token": 1e9,
                          "moe": label != "dense"}
    return data, matched


def _fake_json(seed: int, shared: bool):
    layer = {"load": [3, 1], "dead": 0, "top_tokens": {"0": [["a|b", 0.5], ["`x", 0.5]], "1": []},
             "consecutive": {"first": 0.5 + 0.01 * seed, "first_uniform": 0.5, "first_load_weighted": 0.6,
                             "any": 0.8, "any_uniform": 0.9, "any_load_aware": 0.85, "any_load_aware_std": 0.01}}
    knockout = {"top1_routed": 0.1 + 0.01 * seed, **({"shared": 0.3} if shared else {})}
    return {"loss": 2.0 + seed, "layers": {"0": layer}, "sources": ["s"], "knockout": knockout,
            "saturation_by_layer": {"5": {"0": {"overlap": 0.6, "chance": 0.2 + 0.01 * seed}},
                                    "10": {"0": {"overlap": 0.7, "chance": 0.3}}}}


def _fake_analysis(seed: int, shared: bool):
    return analysis.Analysis.from_json(_fake_json(seed, shared))


def _document(losses, shared=("deepseekmoe",), precision="bf16", contrasts=None):
    seeds = len(next(iter(losses.values())))
    data, matched = _fake_runs(losses, precision)
    analyses = {label: [_fake_analysis(s, label in shared) for s in range(seeds)] for label in losses
                if label != "dense"}
    labels = list(losses)
    contrasts = contrasts or (Contrast(labels[1], labels[0], "active", "t"),)
    settings = CompareSettings(train=TrainConfig(precision="auto"), seeds=seeds)
    return report.build_document("t", Suite([Arch(label, "dense") for label in labels], contrasts=contrasts),
                                 settings, matched, data, analyses, judge(contrasts, losses, 0.03), None)


def test_an_architecture_without_traced_layers_does_not_stop_the_report():
    # table-1's hash layers are not traced: its analysis has no layers, and the report still renders
    data, matched = _fake_runs({"hash": [2.0, 2.1], "gshard": [1.9, 2.0]})
    runs = {label: [_fake_analysis(s, False) for s in range(2)] for label in data}
    runs["hash"] = [analysis.Analysis(r.loss, r.sources, {}) for r in runs["hash"]]
    contrasts = (Contrast("gshard", "hash", "total", "t"),)
    doc = report.build_document("t", Suite([Arch("hash", "dense"), Arch("gshard", "dense")], contrasts=contrasts),
                                CompareSettings(seeds=2), matched, data, runs,
                                judge(contrasts, {k: [f["val_loss"] for f in v["final"]] for k, v in data.items()},
                                      0.03), None)
    assert "| gshard | 0 |" in report.to_markdown(doc)


def test_knock_out_of_shared_experts_is_na_for_models_without_them():
    md = report.to_markdown(_document({"gshard": [2.0, 2.1], "deepseekmoe": [1.9, 2.0]}))
    assert "| gshard | +0.1050 ± 0.0635 | n/a |" in md and "nan" not in md


def test_html_holds_the_knock_out_table_and_renders_code_spans():
    page = report.to_html(_document({"gshard": [2.0, 2.1], "deepseekmoe": [1.9, 2.0]}), "t")
    assert "<th><code>top1_routed</code></th><th><code>shared</code></th>" in page
    assert "<code>a|b</code>" in page and "`" not in page.replace("<code>`x</code>", "")
    parser = _Strict()
    parser.feed(page)
    assert not parser.stack


def test_markdown_code_spans_survive_backticks_and_table_pipes():
    md = report.to_markdown(_document({"gshard": [2.0, 2.1], "deepseekmoe": [1.9, 2.0]}))
    assert "#0: `a\\|b` `` `x ``" in md


def test_setup_line_shows_the_precision_the_runs_resolved():
    md = report.to_markdown(_document({"dense": [2.0], "gshard": [2.1]}, precision="fp32"))
    assert ", fp32, 1 seed(s)." in md and "auto" not in md


def test_collect_reads_each_runs_resolved_precision(tmp_path):
    arch = Arch("dense", "dense")
    run = tmp_path / "runs" / "dense" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "eval", "step": 1, "val_loss": 2.0}\n')
    (run / "summary.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"train_config": {"precision": "bf16"}}))
    assert collect.collect(tmp_path, [arch], seeds=1)["dense"]["precision"] == ["bf16"]


def test_one_seed_resolves_nothing_and_draws_no_band(monkeypatch):
    titles = []
    monkeypatch.setattr(plots, "_png", lambda fig: titles.append(fig.axes[0].get_title()) or b"")
    md = report.to_markdown(_document({"dense": [2.0], "gshard": [2.1], "deepseekmoe": [1.9]}))
    assert "1 seed: no interval, nothing resolved" in md and "gshard − deepseekmoe: +0.200 nats (1 seed" in md
    assert "agrees" not in md and "±" not in md
    assert titles[0] == "Validation loss (one seed: no band)"


def test_curves_title_names_the_t_band_and_the_seeds(monkeypatch):
    titles = []
    monkeypatch.setattr(plots, "_png", lambda fig: titles.append(fig.axes[0].get_title()) or b"")
    _document({"dense": [2.0, 2.1, 2.2], "gshard": [2.1, 2.0, 2.3]})
    assert titles[0] == "Validation loss: mean over 3 seeds, band = 95% t-interval of the mean"


def test_saturation_legend_names_steps(monkeypatch):
    legends = {}
    monkeypatch.setattr(plots, "_png", lambda fig: legends.update(
        {fig.axes[0].get_title(): fig.axes[0].get_legend()}) or b"")
    _document({"gshard": [2.0, 2.1], "deepseekmoe": [1.9, 2.0]})
    (title,) = [t for t in legends if t.startswith("Share of final top-k")]
    assert legends[title].get_title().get_text() == "step"
    assert [t.get_text() for t in legends[title].get_texts()] == ["5", "10"]  # in step order, not string order


def test_papers_order_is_claimed_only_when_resolved():
    unresolved = report.to_markdown(_document({"dense": [2.0, 2.5, 1.8], "deepseekmoe": [1.9, 2.6, 1.6]}))
    assert ("DeepSeekMoE Table 1: deepseekmoe below dense (1.808 against 2.060, -0.252). Ours, deepseekmoe − dense: "
            "-0.067 nats" in unresolved)
    assert "not resolved" in unresolved and "neither supports nor contradicts the paper" in unresolved
    agrees = report.to_markdown(_document({"dense": [2.0, 2.5, 1.8], "deepseekmoe": [1.8, 2.31, 1.59]}))
    assert "resolved (detectable" in agrees and "agrees with the paper" in agrees
    opposite = report.to_markdown(_document({"dense": [1.8, 2.31, 1.59], "deepseekmoe": [2.0, 2.5, 1.8]}))
    assert "the opposite order to the paper's" in opposite


def test_holm_runs_over_the_preregistered_contrasts_alone_and_the_rest_is_exploratory():
    losses = {"dense": [2.0, 2.1, 2.05], "switch": [1.9, 2.0, 1.97], "gshard": [1.95, 1.9, 1.93],
              "deepseekmoe": [1.8, 1.85, 1.81]}
    contrasts = (Contrast("deepseekmoe", "gshard", "total", "t"), Contrast("gshard", "switch", "total", "t"))
    verdict = judge(contrasts, losses, 0.03)
    registered = [p for _, p in verdict.contrasts]
    assert [(p.a, p.b) for p in registered] == [("deepseekmoe", "gshard"), ("gshard", "switch")]
    alone = judge(contrasts[:1], losses, 0.03).contrasts[0][1]
    assert registered[0].mean == alone.mean and registered[0].level <= alone.level  # m = 2 here, 1 there
    # every other architecture against the best, each uncorrected; the registered pair is not repeated
    assert [(p.a, p.b, p.level) for p in verdict.exploratory] == [("dense", "deepseekmoe", 0.05),
                                                                  ("switch", "deepseekmoe", 0.05)]
    # the papers' orders: a registered pair carries its corrected result, the others are exploratory
    claims = {(c.result.a, c.result.b): c.registered for c in verdict.claims}
    assert claims == {("deepseekmoe", "gshard"): True, ("gshard", "switch"): True, ("switch", "dense"): False}
    assert verdict.needed(registered[0]) >= 2


def test_analyses_are_summarised_over_seeds_at_the_paths_one_seed_has():
    per_seed = [_fake_analysis(s, shared=True).to_json() for s in range(3)]
    over = collect.over_seeds(per_seed)
    assert over["seeds"] == 3 and over["knockout"]["top1_routed"]["values"] == pytest.approx([0.1, 0.11, 0.12])
    assert over["layers"]["0"]["consecutive"]["first"]["mean"] == pytest.approx(0.51)
    assert over["saturation"]["5"]["sd"] == 0.0 and "top_tokens" not in over["layers"]["0"]
    assert over["saturation_by_layer"]["5"]["0"]["chance"]["mean"] == pytest.approx(0.21)
    one = collect.over_seeds([_fake_analysis(0, shared=False).to_json()])
    assert one["loss"]["sd"] is None and "shared" not in one["knockout"]
    saved = collect.analysis_json({"moe": [_fake_analysis(s, True) for s in range(2)]})["moe"]
    assert saved["loss"] == 2.0 and saved["other_seeds"]["1"]["loss"] == 3.0 and saved["over_seeds"]["seeds"] == 2


def test_a_bad_data_file_is_refused_before_the_suite_starts(tmp_path):
    (tmp_path / "wiki.tokens").write_text("some text\n")
    settings = CompareSettings(data=DataConfig(data=str(tmp_path / "wiki.tokens")))
    with pytest.raises(ValueError, match=r"^data .*wiki\.tokens: unsupported file type '\.tokens'"):
        run_suite("seeds-debate", None, settings, tmp_path / "suite")
    assert not (tmp_path / "suite").exists()


def test_balance_curve_is_the_mean_over_seeds_with_its_band(monkeypatch):
    drawn = {}

    class Axes:
        lines = True

        def plot(self, x, y, label):
            drawn["mean"] = (list(x), list(y))

        def fill_between(self, x, lo, hi, alpha):
            drawn["band"] = (list(lo), list(hi))

        def set_title(self, title):
            drawn["title"] = title

        def __getattr__(self, name):
            return lambda *a, **k: None

    monkeypatch.setattr(plots, "_png", lambda fig: b"")
    monkeypatch.setattr(plots, "_figure", lambda: type("P", (), {"subplots": lambda *a, **k: (None, Axes())}))
    # seed 1 skipped step 2: only the steps every seed trained are drawn
    plots.fig_balance({"moe": {"balance": [([1, 2, 3], [0.2, 0.4, 0.6]), ([1, 3], [0.4, 0.8])]}})
    assert drawn["mean"] == ([1, 3], [pytest.approx(0.3), pytest.approx(0.7)])
    assert drawn["band"][0][0] < 0.3 < drawn["band"][1][0] and "mean over 2 seeds" in drawn["title"]


def test_collect_reads_how_routing_ended_and_the_report_shows_drops_only_when_there_are_some(tmp_path):
    arch = Arch("cf-1.0", "gshard")
    run = tmp_path / "runs" / "cf-1.0" / "seed0"
    run.mkdir(parents=True)

    def layer(cv, hot, dropped):
        return {"load_cv": cv, "max_mean": hot, "load": [1, 1], "dropped_frac": dropped}

    steps = [{"kind": "train", "step": s, "router": {"0": layer(cv, 2.0, d), "1": layer(0.1, 3.0, 0.0)}}
             for s, (cv, d) in enumerate([(0.9, 0.4)] * 18 + [(0.3, 0.2)] * 2, start=1)]
    rows = [*steps, {"kind": "eval", "step": 20, "val_loss": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"train_config": {"precision": "fp32"}}))
    end = collect.collect(tmp_path, [arch], seeds=1)["cf-1.0"]["routing_end"][0]
    # the last tenth is the last 2 steps; the layer mean of the drops is (d + 0) / 2
    assert end == pytest.approx({"load_cv": 0.2, "max_mean": 3.0, "dropped": 0.19, "dropped_end": 0.1})

    data, _ = _fake_runs({"dropless": [2.0, 2.1], "cf-1.0": [2.1, 2.2], "dense": [2.0, 2.0]})
    data["dropless"]["routing_end"] = [{"load_cv": 0.2, "max_mean": 2.0, "dropped": 0.0, "dropped_end": 0.0}] * 2
    data["cf-1.0"]["routing_end"] = [{"load_cv": 0.2, "max_mean": 2.0, "dropped": d, "dropped_end": 0.1}
                                     for d in (0.15, 0.25)]
    data["dense"]["routing_end"] = [None, None]
    md = report.to_markdown(report.routing_end_blocks(data))
    assert "| cf-1.0 | 0.200 ± 0.000 | 2.00 ± 0.00 | 20.00 ± 63.53% | 10.00 ± 0.00% |" in md
    assert "| dropless | 0.200 ± 0.000 | 2.00 ± 0.00 | 0.00 ± 0.00% |" in md and "dense" not in md
    data.pop("cf-1.0")
    assert "dropped" not in report.to_markdown(report.routing_end_blocks(data))
    assert report.routing_end_blocks(_fake_runs({"dense": [2.0]})[0]) == []
