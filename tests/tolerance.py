"""Comparisons with an oracle at a tolerance scaled to the signal.

:func:`assert_matches` bounds the largest absolute error by ``ulps`` float32 epsilons of the
peak magnitude of the expected stems: ``max |got - expected| <= ulps * eps * max |expected|``.

Why the peak: what the pipeline adds to the network's own rounding is float32 arithmetic on
whole stems (normalisation, products by transition weights and bag weights, sums over
overlapping segments, shifts and models, de-normalisation), whose rounding errors are
relative to the magnitudes summed, all bounded by the stems' peak. A bound relative to each
sample would explode where a stem crosses zero; a fixed absolute one (the former 1e-4)
ignores the scale: the test models' stems peak at ~0.09, where 1e-4 is ~10^4 epsilons of the
peak and hides systematic errors (a biased standard deviation, a flat window, a sample off)
that a bound of a few epsilons of the peak shows. The bound also holds for any output scale
of a random-weight model.

Setting ``STEMSERVE_ERRORS_LOG`` to a file appends one JSON line per comparison (the test,
what was compared, the error, the peak, the error in epsilons of the peak and the bound):
how the bounds in the tests were measured (see their comments).
"""
from __future__ import annotations

import json
import os

import numpy as np

EPS = float(np.finfo(np.float32).eps)
"""float32's machine epsilon, 2**-23 (~1.19e-7)."""
LOG_ENV = "STEMSERVE_ERRORS_LOG"


def error_ulps(got: np.ndarray, expected: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, peak |expected|, the error in epsilons of the peak)."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    assert got.shape == expected.shape, f"shape {got.shape}, expected {expected.shape}"
    error = float(np.abs(got - expected).max())
    peak = float(np.abs(expected).max())
    if peak == 0:
        return error, peak, 0.0 if error == 0 else float("inf")
    return error, peak, error / (EPS * peak)


def _record(what: str, error: float, peak: float, ulps: float, bound: float) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    entry = dict(test=os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0], what=what,
                 error=error, peak=peak, ulps=round(ulps, 3), bound=bound)
    with open(path, "a") as file:
        file.write(json.dumps(entry) + "\n")


def assert_matches(got: np.ndarray, expected: np.ndarray, ulps: float, what: str = "") -> float:
    """Fail unless ``max |got - expected| <= ulps * eps(float32) * max |expected|``.

    Returns the error in epsilons of the peak. A NaN anywhere fails.
    """
    error, peak, measured = error_ulps(got, expected)
    _record(what, error, peak, measured, ulps)
    assert measured <= ulps, (
        f"{what + ': ' if what else ''}max abs error {error:.3g} is {measured:.1f} float32 "
        f"epsilons of the expected peak {peak:.3g}; the bound is {ulps} "
        f"({ulps * EPS * peak:.3g})")
    return measured


def assert_differs(got: np.ndarray, expected: np.ndarray, ulps: float, what: str = "") -> float:
    """Fail unless the error is over ``ulps`` epsilons of the peak: the comparison can fail."""
    error, peak, measured = error_ulps(got, expected)
    assert measured > ulps, (f"{what + ': ' if what else ''}max abs error {error:.3g} is only "
                             f"{measured:.1f} epsilons of the peak {peak:.3g}, not over {ulps}")
    return measured
