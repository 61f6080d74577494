import math

import pytest

from smoe.eval.ladder import Multiplier, dense_flops_at, multiplier

# Three dense rungs: each doubling of compute lowers the loss by 0.1.
RUNGS = [(1e12, 3.0), (2e12, 2.9), (4e12, 2.8)]


def test_the_dense_compute_at_a_loss_is_interpolated_in_log_flops():
    assert dense_flops_at(2.9, RUNGS) == (pytest.approx(2e12), None)
    flops, bound = dense_flops_at(2.85, RUNGS)
    assert bound is None and flops == pytest.approx(math.sqrt(2e12 * 4e12))  # halfway in log-FLOPs


def test_an_moe_at_the_middle_rungs_loss_with_half_its_compute_is_worth_two():
    assert multiplier(1e12, 2.9, RUNGS) == Multiplier(pytest.approx(2.0))


def test_outside_the_ladder_only_a_bound_is_given():
    assert multiplier(1e12, 2.7, RUNGS) == Multiplier(pytest.approx(4.0), ">")  # better than the largest rung
    assert multiplier(1e12, 3.1, RUNGS) == Multiplier(pytest.approx(1.0), "<")
    assert str(multiplier(1e12, 2.7, RUNGS)) == ">4.00x"


def test_rungs_are_taken_in_order_of_compute_even_when_noise_bends_the_curve():
    noisy = [(4e12, 2.8), (1e12, 3.0), (2e12, 3.05)]  # the middle rung came out worse than the smallest
    flops, bound = dense_flops_at(2.9, noisy)
    assert bound is None and 2e12 < flops < 4e12


def test_a_ladder_needs_two_rungs():
    with pytest.raises(ValueError, match="ladder: needs at least two dense rungs"):
        dense_flops_at(3.0, [(1e12, 3.0)])
