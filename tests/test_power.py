"""The power check (smoe.eval.power): the ladder's fit, effective compute multipliers read from it, whether the
regime can show the contrasts' gaps, and how many steps it would need."""

import math

import pytest

from smoe.eval import power
from smoe.eval.document import to_markdown
from smoe.eval.stats import compare_pairs

# A dense ladder on which log L falls by 0.05 per doubling of compute, exactly: L = 4 (C / 1e12)^(-0.05 / ln 2).
SLOPE = -0.05 / math.log(2)


def _loss(flops: float, offset: float = 0.0) -> float:
    return 4.0 * (flops / 1e12) ** SLOPE + offset


def _rungs(seeds: int = 3, noise=(0.0, 0.01, -0.01)):
    return {f"dense-{k}": [(1e12 * 2**k, _loss(1e12 * 2**k, noise[s % len(noise)] * (k % 2))) for s in range(seeds)]
            for k in range(5)}


def test_the_fit_recovers_a_power_law_and_reads_compute_off_it():
    fit = power.LadderFit.of([(1e12 * 2**k, _loss(1e12 * 2**k)) for k in range(5)])
    assert fit.slope == pytest.approx(SLOPE) and fit.residual_sd == pytest.approx(0.0, abs=1e-12)
    assert fit.flops_at(_loss(3e12)) == pytest.approx(3e12) and fit.descends
    assert fit.flops == (pytest.approx(1e12), pytest.approx(16e12))


def test_a_noisy_rung_bends_the_fit_instead_of_deciding_a_bracket():
    # the middle rung came out worse than the smallest: bracketing would place a loss between them at random
    noisy = [(1e12, 3.0), (2e12, 3.05), (4e12, 2.8), (8e12, 2.7)]
    fit = power.LadderFit.of(noisy)
    assert fit.descends and 1e12 < fit.flops_at(2.95) < 4e12


def test_an_moe_at_the_rung_of_twice_its_compute_is_worth_two_and_outside_values_are_marked():
    rungs = _rungs(noise=(0.0,))
    moes = {"moe": [(1e12, _loss(2e12))] * 3, "far": [(1e12, _loss(64e12))] * 3}
    check = power.check(rungs, moes, [], None, 100, "dense-0")
    by = {m.label: m for m in check.multipliers}
    assert by["moe"].per_seed == pytest.approx((2.0,) * 3) and by["moe"].outside == (False,) * 3
    assert by["far"].per_seed == pytest.approx((64.0,) * 3) and by["far"].outside == (True,) * 3
    assert by["moe"].exploratory and "2x, 95% CI [2, 2] (exploratory)" in by["moe"].summary()


def test_the_multiplier_interval_takes_the_level_of_its_contrast_against_dense():
    rungs = _rungs()
    moes = {"moe": [(1e12, _loss(2e12) + d) for d in (0.0, 0.01, -0.01)]}
    losses = {"moe": [x for _, x in moes["moe"]], "dense-0": [x for _, x in rungs["dense-0"]],
              "dense-1": [x for _, x in rungs["dense-1"]]}
    contrasts = compare_pairs([("moe", "dense-0"), ("moe", "dense-1")], losses)
    (m,) = power.check(rungs, moes, contrasts, None, 100, "dense-0").multipliers
    assert not m.exploratory and m.spread.level == pytest.approx(1 - contrasts[0].level)


def test_the_regime_is_enough_when_the_ends_differ_by_five_detectable_gaps():
    rungs = _rungs()  # ends differ by 4 - 4 * 16^SLOPE = 0.72 nats
    contrast = compare_pairs([("a", "b")], {"a": [1.0, 1.02, 0.99], "b": [1.0, 1.0, 1.0]})
    check = power.check(rungs, {}, contrast, None, 100, None)
    assert check.ends.mean == pytest.approx(4 - _loss(16e12), abs=0.01)
    assert check.enough is (check.ends.mean >= 5 * check.detectable) and check.span == pytest.approx(16.0)
    assert "can show gaps of the contrasts' size" in to_markdown(check.blocks(1000))


def test_an_early_regime_says_how_many_steps_the_ladders_curve_needs():
    close = {f"dense-{k}": [(1e12 * 2**k, 3.0 - 0.05 * k)] * 3 for k in range(5)}  # the ends differ by 0.2
    contrast = compare_pairs([("a", "b")], {"a": [1.0, 1.02, 0.98], "b": [1.0, 1.0, 1.0]})  # detectable ~0.06
    # along training the ends' gap grows by 0.05 per e-fold of steps from 0.05 at step 10
    steps = [10, 20, 40, 80, 160]
    small = [[(s, 5.0) for s in steps]] * 3
    large = [[(s, 5.0 - 0.05 - 0.05 * math.log(s / 10)) for s in steps]] * 3
    check = power.check(close, {}, contrast, (small, large), 160, None)
    target = 5 * check.detectable
    assert check.enough is False and check.gap_grows and 0.2 < target
    assert check.steps_needed == math.ceil(10 * math.exp((target - 0.05) / 0.05))
    assert f"at about {check.steps_needed:,} steps" in to_markdown(check.blocks(1000))
    slow = [[(s, 5.0 - 0.05 - 0.001 * math.log(s / 10)) for s in steps]] * 3
    check = power.check(close, {}, contrast, (small, slow), 160, None)
    assert "only beyond 100 times these runs' 160 steps" in to_markdown(check.blocks(1000))
    flat = [[(s, 5.0 - 0.05) for s in steps]] * 3
    check = power.check(close, {}, contrast, (small, flat), 160, None)
    assert check.steps_needed is None and check.gap_grows is False
    assert "does not widen along these runs" in to_markdown(check.blocks(1000))


def test_one_seed_checks_nothing():
    check = power.check(_rungs(seeds=1), {}, compare_pairs([("a", "b")], {"a": [1.0], "b": [1.1]}), None, 100, None)
    assert check.enough is None and "Not checked: with one seed" in to_markdown(check.blocks(1000))


def test_a_ladder_needs_two_rungs():
    with pytest.raises(ValueError, match="ladder: needs at least two dense rungs"):
        power.LadderFit.of([(1e12, 3.0)])
