"""The two-phase `upcycling` suite: a dense trunk per seed, its branches (dense continued, upcycled by copy and
split) started from that seed's trunk on the data order after it, the same MoEs from scratch on the same tokens,
and the report's compute comparison."""

import json
import re

import numpy as np
import pytest

from smoe.eval.compare import run_suite
from smoe.eval.document import to_markdown
from smoe.eval.layout import fingerprint, init_dir, run_dir, suite_definition
from smoe.eval.settings import CompareSettings
from smoe.eval.suite import Arch, Contrast, Suite
from smoe.eval.suites import SUITES
from smoe.eval.upcycling import TwoPhase
from smoe.train.config import DataConfig, TrainConfig
from smoe.upcycling.spec import UpcycleSpec

TINY = {"dim": 32, "n_layers": 2, "vocab_size": 300, "ffn_dim": 64, "attention.n_heads": 2, "attention.n_kv_heads": 2,
        "max_seq_len": 64}
SPLIT = UpcycleSpec("split", 4, 2, partition="clustering")
TINY_UPCYCLING = Suite([  # the suite's shape at test size; copy's exact start is the dense branch's path here
    Arch("dense", "dense", TINY, from_trunk=True),
    Arch("upcycled-split", "dense", TINY, upcycle=SPLIT, from_trunk=True),
    Arch("scratch-split", "dense", TINY, upcycle=SPLIT),
], contrasts=(Contrast("upcycled-split", "dense", "tokens", "t"),), matching="none", trunk=Arch("trunk", "dense", TINY))


def test_the_fingerprint_holds_the_contrasts_and_not_the_seeds():
    settings = CompareSettings(data=DataConfig(data="stdlib"), seeds=2)
    suite = SUITES["seeds-debate"]
    same = fingerprint(suite_definition("seeds-debate", suite, settings))
    assert fingerprint(suite_definition("seeds-debate", suite, CompareSettings(data=DataConfig(data="stdlib"),
                                                                              seeds=16))) == same
    fewer = Suite(suite.archs, contrasts=suite.contrasts[:1], ladder=suite.ladder)
    assert fingerprint(suite_definition("seeds-debate", fewer, settings)) != same


def test_the_upcycling_suite_builds_what_the_issue_names():
    suite = SUITES["upcycling"]
    configs = {a.label: a.config() for a in suite.archs}
    assert suite.trunk.config().moe is None and configs["dense"] == suite.trunk.config()
    assert configs["upcycled-copy"] == configs["scratch-copy"] and configs["upcycled-split"] == configs["scratch-split"]
    assert (configs["upcycled-copy"].moe.expert_dim, configs["upcycled-split"].moe.expert_dim) == (512, 32)
    assert [a.from_trunk for a in suite.archs] == [True, True, True, False, False]


@pytest.mark.slow
def test_two_phase_suite_trains_its_branches_from_each_seeds_trunk_and_reports_compute(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = "a red fox ran to the big tree and saw one small bird sing".split()
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(" ".join(rng.choice(words, 60)) for _ in range(40)))
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(SUITES, "tiny-upcycling", TINY_UPCYCLING)
    settings = CompareSettings(train=TrainConfig(steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=2,
                                                 precision="fp32"),
                               data=DataConfig(data=str(tmp_path / "a.txt")), seeds=2, checkpoints=2, trunk_steps=6,
                               val_tokens=64)
    out = tmp_path / "suite"
    report = run_suite("tiny-upcycling", None, settings, out, log=lambda m: None, jobs=2)

    trunk, archs = TINY_UPCYCLING.trunk, {a.label: a for a in TINY_UPCYCLING.archs}
    for seed in (0, 1):
        runs = {label: json.loads((run_dir(out, a, seed) / "run.json").read_text())["train_config"]
                for label, a in {"trunk": trunk, **archs}.items()}
        # one schedule of 10 steps for all: the trunk stops at 6, the branches continue it, scratch runs all of it
        assert (runs["trunk"]["steps"], runs["trunk"]["schedule_steps"]) == (6, 10)
        assert (runs["scratch-split"]["steps"], runs["scratch-split"]["start_step"]) == (10, 0)
        assert runs["dense"]["init_from"] == str(run_dir(out, trunk, seed))
        for label in ("dense", "upcycled-split"):
            assert (runs[label]["steps"], runs[label]["start_step"], runs[label]["seed"]) == (4, 6, seed)
        assert runs["upcycled-split"]["init_from"] == str(init_dir(out, archs["upcycled-split"], seed))
        assert runs["scratch-split"]["init_from"] is None
    # paired seeds: each seed's branches start from its own trunk, upcycled with its seed
    firsts = [json.loads(line)["loss"] for seed in (0, 1)
              for line in (run_dir(out, archs["upcycled-split"], seed) / "metrics.jsonl").read_text().splitlines()[:1]]
    assert firsts[0] != firsts[1]

    md = (out / "report.md").read_text()
    assert report == out / "report.html" and "Upcycling: loss against training compute" in report.read_text()
    assert "Not matched on parameters" in md and "Upcycling: loss against training compute" in md
    assert (out / "plots" / "compute.png").is_file() and (out / "plots" / "curves.png").is_file()
    assert re.search(r"\| upcycled-split \| \d\.\d\d \| .* \| .* \| .* \|", md)  # compute to reach dense's loss
    # any of the four verdicts: the tiny runs' tokenizer (and so their losses) differs between processes
    assert re.search(r"- upcycled-split − dense: [+-]\d\.\d{3} nats.*: (neither supports nor contradicts "
                     r"Komatsuzaki et al\.'s result|Komatsuzaki et al\.'s result (holds|does not hold)|behind the "
                     r"dense continuation, though with less compute)", md)
    assert "steps 7-10 of the same data order" in md

    # rerunning trains and upcycles nothing again; other trunk steps are another suite
    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("runs/*/*/summary.json"), *out.glob("init/*/*/*")]}
    run_suite("tiny-upcycling", None, settings, out, log=lambda m: None)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    with pytest.raises(ValueError, match="holds a suite with a different definition"):
        run_suite("tiny-upcycling", None, CompareSettings(**{**settings.__dict__, "trunk_steps": 5}), out)


def test_compute_to_reach_the_dense_loss_and_the_equal_compute_comparison_on_known_curves():
    """Trunk: 10 steps at 1 FLOP per token (its compute is the unit). Dense continued (1 FLOP/token) and an exact
    copy (2 FLOPs/token) start at the trunk's final loss 2.0; the copy from scratch counts its own compute only."""
    def run(steps, losses, fpt, final=None):
        return {"curves": [(steps, losses)], "final": [{"val_loss": losses[-1] if final is None else final}],
                "summaries": [{"train_flops_per_token": fpt}]}

    copy = UpcycleSpec("copy", 4, 2)
    two_phase = TwoPhase([Arch("dense", "dense", from_trunk=True),
                          Arch("upcycled-copy", "dense", upcycle=copy, from_trunk=True),
                          Arch("scratch-copy", "dense", upcycle=copy)],
                         run([5, 10], [3.0, 2.0], 1.0),
                         CompareSettings(train=TrainConfig(steps=10, batch_size=1, seq_len=1), trunk_steps=10))
    data = {"dense": run([5, 10], [1.8, 1.6], 1.0), "upcycled-copy": run([5, 10], [1.5, 1.4], 2.0),
            "scratch-copy": run([10, 20], [2.5, 1.55], 2.0)}
    curves = two_phase.compute_curves(data)
    assert curves["dense"] == [([1.0, 1.5, 2.0], [2.0, 1.8, 1.6])]
    assert curves["upcycled-copy"] == [([1.0, 2.0, 3.0], [2.0, 1.5, 1.4])]
    assert curves["scratch-copy"] == [([2.0, 4.0], [2.5, 1.55])]
    md = to_markdown(two_phase.blocks(data))
    # 1.6 is reached at 1.8 by the copy (0.8 of the way from 2.0 to 1.5) and at 2 + 2 x 0.9/0.95 from scratch
    assert "| upcycled-copy | 2.00 | 1.80 (one seed) | +0.80 (one seed) | +0.80 |" in md
    assert "| scratch-copy | 2.00 | 3.89 (one seed) | +2.89 (one seed) | +2.89 |" in md
    assert "- upcycled-copy − dense: -0.100 nats: neither supports nor contradicts" in md  # one seed: no interval
    assert "- scratch-copy − dense: +0.900 nats." in md


@pytest.mark.parametrize("suite, changes, match", [
    ("seeds-debate", {"trunk_steps": 10}, r"trunk_steps: only with a two-phase suite \(upcycling\)"),
    ("upcycling", {"tune_lr": (1e-3, 2e-3)}, r"tune_lr: not with the two-phase suite 'upcycling'"),
])
def test_two_phase_settings_are_refused_where_they_do_not_apply(tmp_path, suite, changes, match):
    with pytest.raises(ValueError, match=match):
        run_suite(suite, None, CompareSettings(**changes), tmp_path / "out")
    assert not (tmp_path / "out").exists()
