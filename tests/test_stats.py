"""fastmask.experiments.stats: the t quantile, the regularised incomplete beta function and the mean / 95%
t-interval over seeds against values computed by hand from closed forms (no scipy), and the nested summaries."""

from __future__ import annotations

import math

import pytest

from fastmask.experiments.stats import (ci_above, format_mean_ci, mean_ci, regularized_beta, summarize, t_cdf,
                                        t_quantile)


def test_regularized_beta_closed_forms():
    for x in (0.0, 0.1, 0.37, 0.9, 1.0):
        assert regularized_beta(1, 1, x) == pytest.approx(x, abs=1e-12)
        assert regularized_beta(3, 1, x) == pytest.approx(x ** 3, abs=1e-12)          # I_x(a, 1) = x^a
        assert regularized_beta(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-12)  # I_x(1, b)
    assert regularized_beta(0.5, 0.5, 0.25) == pytest.approx(2 / math.pi * math.asin(0.5), abs=1e-12)
    with pytest.raises(ValueError, match="a and b must be > 0"):
        regularized_beta(0, 1, 0.5)
    with pytest.raises(ValueError, match=r"x must be in \[0, 1\]"):
        regularized_beta(1, 1, 1.5)


def test_t_cdf_and_quantile_closed_forms():
    # df = 1 (Cauchy): F(t) = 1/2 + atan(t)/pi, so t_p = tan(pi (p - 1/2)); df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so t_p = (2p - 1) / sqrt(2 p (1 - p)).
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-8)  # 12.7062047...
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-8)  # 4.3026527...
    assert t_quantile(0.9, 2) == pytest.approx(0.8 / math.sqrt(2 * 0.9 * 0.1), abs=1e-8)
    assert t_quantile(0.025, 1) == pytest.approx(-math.tan(0.475 * math.pi), abs=1e-8)
    # the printed tables (4 digits) for the seed counts a run uses, and the normal limit
    for df, table in ((3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=6e-5)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be > 0"):
        t_quantile(0.9, 0)


def test_mean_ci_by_hand():
    s = mean_ci([1.0, 2.0, 3.0])  # mean 2, sample std 1, half-width t_{0.975, 2} / sqrt(3)
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0) and s["n"] == 3
    assert s["half_width"] == pytest.approx(t2 / math.sqrt(3), abs=1e-8)  # 2.4841...
    assert (s["low"], s["high"]) == pytest.approx((2 - t2 / math.sqrt(3), 2 + t2 / math.sqrt(3)), abs=1e-8)
    two = mean_ci([0.1, 0.3])  # std 0.1 * sqrt(2), half-width tan(0.475 pi) * 0.1
    assert two["half_width"] == pytest.approx(math.tan(0.475 * math.pi) * 0.1, abs=1e-9)
    ninety = mean_ci([0.1, 0.3], confidence=0.9)
    assert ninety["half_width"] == pytest.approx(math.tan(0.45 * math.pi) * 0.1, abs=1e-9)
    same = mean_ci([0.5, 0.5, 0.5])
    assert same["half_width"] == 0.0 and same["low"] == same["high"] == 0.5
    one = mean_ci([0.7])
    assert one["mean"] == 0.7 and one["half_width"] is None and one["low"] is None
    assert ci_above(one) is None and ci_above(s, 0.0) is False and ci_above(mean_ci([0.2, 0.25, 0.3])) is True
    with pytest.raises(ValueError, match="at least one number"):
        mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([0.1, 0.2], confidence=95)


def test_summarize_keeps_the_shape_and_names_where_seeds_differ():
    runs = [{"acc": [0.8, 0.5], "gap": {"mask_0": 0.3}, "none": None},
            {"acc": [0.6, 0.7], "gap": {"mask_0": 0.1}, "none": None}]
    s = summarize(runs)
    assert s["acc"][0]["mean"] == pytest.approx(0.7) and s["acc"][1]["values"] == [0.5, 0.7]
    assert s["gap"]["mask_0"]["half_width"] == pytest.approx(math.tan(0.475 * math.pi) * 0.1, abs=1e-9)
    assert s["none"] is None
    with pytest.raises(ValueError, match=r"value\['acc'\] has 2 items"):
        summarize([{"acc": [1, 2]}, {"acc": [1]}])
    with pytest.raises(ValueError, match=r"value\['gap'\] has keys"):
        summarize([{"gap": {"a": 1}}, {"gap": {"b": 1}}])
    with pytest.raises(ValueError, match=r"value\[1\] must be a number"):
        summarize([[1, 2], [1, "x"]])
    assert format_mean_ci(mean_ci([0.1, 0.3])) == f"0.200 ± {math.tan(0.475 * math.pi) * 0.1:.3f}"
    assert format_mean_ci(mean_ci([0.05]), signed=True) == "+0.050"
    assert format_mean_ci(None) == ""
