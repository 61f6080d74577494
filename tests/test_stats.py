import math

import numpy as np
import pytest

from smoe.eval import stats


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (10**6, 1.960)])
def test_t_quantile_matches_the_tables(df, table):
    assert stats.t_ppf(0.975, df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_inverts_the_cdf_on_both_sides():
    for df in (1, 3, 17):
        for p in (0.01, 0.3, 0.8, 0.999):
            assert stats.t_cdf(stats.t_ppf(p, df), df) == pytest.approx(p, abs=1e-10)


def test_incomplete_beta_against_closed_forms():
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b
    assert stats.betainc(3.5, 1.0, 0.4) == pytest.approx(0.4**3.5, rel=1e-12)
    assert stats.betainc(1.0, 2.5, 0.7) == pytest.approx(1 - 0.3**2.5, rel=1e-12)


def test_interval_is_mean_plus_minus_t_times_standard_error():
    iv = stats.interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 * 1.0 / math.sqrt(3)
    assert (iv.mean, iv.sd) == (2.0, 1.0)
    assert (iv.low, iv.high) == (pytest.approx(2 - half), pytest.approx(2 + half))


def test_one_value_has_no_interval():
    iv = stats.interval([1.5])
    assert iv.mean == 1.5 and math.isnan(iv.sd) and math.isnan(iv.low) and math.isnan(iv.high)


def test_paired_p_value_of_a_known_sample():
    # mean 2, sd 1, n 3: t = 2 sqrt(3) with 2 df, and the t cdf at 2 df is 1/2 + t / (2 sqrt(2 + t^2))
    t = 2 * math.sqrt(3)
    assert stats.paired_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


def test_holm_steps_down_and_stops_at_the_first_failure():
    levels, rejected = stats.holm_levels([0.01, 0.04, 0.03])
    # sorted 0.01 (rank 1, 0.05/3: rejected), 0.03 (rank 2, 0.05/2: fails), 0.04 (kept at the failing step's level)
    assert rejected == [True, False, False]
    assert levels == pytest.approx([0.05 / 3, 0.025, 0.025])


def test_holm_keeps_a_small_p_value_after_an_earlier_failure():
    # 0.03 fails at 0.025; 0.04 would pass its own step (0.05) but Holm stops at the first failure
    assert stats.holm_levels([0.03, 0.04])[1] == [False, False]


def test_resolved_exactly_when_the_corrected_interval_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.normal(size=5)
    values = {"a": base + 1.0 + 0.1 * rng.normal(size=5), "b": base + 0.05 * rng.normal(size=5),
              "c": base + 0.02 + 0.3 * rng.normal(size=5)}
    result = stats.compare_pairs([("a", "b"), ("c", "b"), ("a", "c")], values)
    for p in result:
        assert p.resolved == (p.ci[0] > 0 or p.ci[1] < 0)
    assert result[0].resolved and not result[1].resolved


def test_pairing_removes_the_shared_seed_effect():
    # a large seed effect common to both architectures, and a constant gap: resolved when paired
    seeds = np.array([0.0, 0.5, -0.4, 0.9])
    (p,) = stats.compare_pairs([("a", "b")], {"a": seeds + 0.01 + [0, 1e-3, -1e-3, 0], "b": seeds})
    assert p.resolved and p.ci[1] - p.ci[0] < 0.01


def test_minimum_detectable_difference_formula():
    (p,) = stats.compare_pairs([("a", "b")], {"a": [1.0, 2.0, 3.0], "b": [0.0, 0.0, 0.0]})
    assert p.mdd == pytest.approx((stats.t_ppf(0.975, 2) + stats.t_ppf(0.8, 2)) * 1.0 / math.sqrt(3))


def test_one_seed_resolves_nothing():
    (p,) = stats.compare_pairs([("a", "b")], {"a": [2.0], "b": [1.0]})
    assert p.mean == 1.0 and not p.resolved and math.isnan(p.ci[0]) and math.isnan(p.mdd)
