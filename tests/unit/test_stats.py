"""normcli.stats: the t quantile against closed forms and printed tables, Welch's interval
against a computation by hand."""

from __future__ import annotations

import math
import statistics

import pytest

from normcli.stats import mean_interval, t_cdf, t_quantile, welch_difference


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_equals_the_closed_forms_for_one_and_two_degrees(p: float) -> None:
    # df = 1 is the Cauchy distribution; df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    q = 2 * p - 1
    assert t_quantile(p, 2) == pytest.approx(q * math.sqrt(2 / (1 - q * q)), rel=1e-9)


@pytest.mark.parametrize(
    ("df", "printed"),
    [(3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042), (120, 1.980)],
)
def test_t_quantile_equals_the_printed_table(df: int, printed: float) -> None:
    assert round(t_quantile(0.975, df), 3) == printed


def test_t_quantile_of_fractional_degrees_lies_between_its_neighbours_and_inverts_the_cdf():
    q = t_quantile(0.975, 2.5)
    assert t_quantile(0.975, 3) < q < t_quantile(0.975, 2)
    assert t_cdf(q, 2.5) == pytest.approx(0.975, abs=1e-9)
    assert t_cdf(-q, 2.5) == pytest.approx(0.025, abs=1e-9)
    with pytest.raises(ValueError):
        t_quantile(0.3, 4)


def test_mean_interval_is_mean_plus_minus_t_times_the_standard_error() -> None:
    values = [99.41, 99.52, 99.47]
    mean, std = statistics.mean(values), statistics.stdev(values)
    low, high = mean_interval(mean, std, 3)
    half = 4.302653 * std / math.sqrt(3)  # t(0.975, 2)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-7)
    assert mean_interval(99.4, None, 1) is None


def test_welch_difference_against_a_computation_by_hand() -> None:
    a, b = [99.50, 99.56, 99.47, 99.53], [99.31, 99.45, 99.40]
    stats = [{"n": len(v), "mean": statistics.mean(v), "std": statistics.stdev(v)} for v in (a, b)]
    d = welch_difference(*stats)
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    assert d.df == pytest.approx(df)
    diff = statistics.mean(a) - statistics.mean(b)
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    assert d.estimate == pytest.approx(diff)
    assert d.interval == pytest.approx((diff - half, diff + half))
    assert (d.n_a, d.n_b) == (4, 3) and d.spans_zero == (diff - half <= 0)
    one = welch_difference({"n": 1, "mean": 1.0, "std": None}, stats[0])
    assert one.interval is None and one.spans_zero
    assert welch_difference({"n": 0, "mean": None, "std": None}, stats[0]) is None
