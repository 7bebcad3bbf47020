"""Theory oracles checked against an independent implementation's values.

The reference is ``shared/reference/learning_coefficients.json``. It is looked up in
this order: the path in ``$ONLINE_LLC_REFERENCE``; ``shared/reference/...`` in this
file's directory or any parent (which covers both ``<repo>/shared`` and a ``shared/``
checked out beside the repository, ``<repo>/../shared``); finally the copy bundled at
``tests/data/learning_coefficients.json``, so the suite never skips for lack of data.
"""

from __future__ import annotations

import doctest
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from online_llc.models import theory
from online_llc.models.theory import (
    deep_linear_network,
    normal_crossing_target,
    reduced_rank_regression,
    regular,
    sum_of_powers,
)

_RELATIVE = Path("shared") / "reference" / "learning_coefficients.json"
_BUNDLED = Path(__file__).resolve().parent / "data" / "learning_coefficients.json"


def _shared_reference() -> Path | None:
    env = os.environ.get("ONLINE_LLC_REFERENCE")
    if env:
        path = Path(env)
        if not path.is_file():  # an explicit request that cannot be met is an error
            raise FileNotFoundError(f"ONLINE_LLC_REFERENCE={env!r} is not a file.")
        return path
    here = Path(__file__).resolve().parent
    for directory in (here, *here.parents):
        if (directory / _RELATIVE).is_file():
            return directory / _RELATIVE
    return None


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


SHARED = _shared_reference()
REFERENCE = _load(SHARED if SHARED is not None else _BUNDLED)


def _entries(key: str) -> list[dict[str, Any]]:
    entries = REFERENCE[key]
    assert entries, f"reference has no {key!r} entries"
    return entries


def test_reference_copies_agree() -> None:
    bundled = _load(_BUNDLED)
    if SHARED is None:
        pytest.skip(f"no shared reference found; the suite uses the bundled copy {_BUNDLED}")
    assert _load(SHARED) == bundled, f"{_BUNDLED} is stale: copy {SHARED} over it"


# ---------------------------------------------------------------- reference values


@pytest.mark.parametrize("e", _entries("regular"), ids=lambda e: f"d={e['d']}")
def test_regular_matches_reference(e: dict[str, Any]) -> None:
    lam, m = regular(e["d"])
    assert lam == pytest.approx(e["lambda"], rel=1e-12)
    assert m == e["m"]


@pytest.mark.parametrize(
    "e",
    _entries("reduced_rank_regression"),
    ids=lambda e: f"M={e['M']},H={e['H']},N={e['N']},r={e['r']}",
)
def test_reduced_rank_regression_matches_reference(e: dict[str, Any]) -> None:
    lam, m = reduced_rank_regression(e["M"], e["H"], e["N"], e["r"])
    assert lam == pytest.approx(e["lambda"], rel=1e-12)
    assert m == e["m"]


@pytest.mark.parametrize(
    "e", _entries("deep_linear_network"), ids=lambda e: f"widths={e['widths']},r={e['r']}"
)
def test_deep_linear_network_matches_reference(e: dict[str, Any]) -> None:
    lam, m = deep_linear_network(e["widths"], e["r"])
    assert lam == pytest.approx(e["lambda"], rel=1e-12)
    assert m == e["m"]


@pytest.mark.parametrize("e", _entries("sum_of_powers"), ids=lambda e: f"k={e['k']}")
def test_sum_of_powers_matches_reference(e: dict[str, Any]) -> None:
    lam, m = sum_of_powers(e["k"])
    assert lam == pytest.approx(e["lambda"], rel=1e-12)
    assert m == e["m"]


@pytest.mark.parametrize(
    "e",
    _entries("normal_crossing_finite_nbeta"),
    ids=lambda e: f"a={e['a']},b={e['b']},c={e['c']},nbeta={e['nbeta']:g}",
)
def test_normal_crossing_target_matches_reference(e: dict[str, Any]) -> None:
    # The reference rounds targets to 4 significant digits (<= 1.5e-4 relative here);
    # the integral itself is accurate to ~1e-9, so 2e-3 only absorbs the rounding.
    got = normal_crossing_target(e["a"], e["b"], e["c"], e["nbeta"])
    assert got == pytest.approx(e["target"], rel=2e-3)
    # The reference's lambda and m are the ones the sum-of-powers theory gives for the
    # dominant coordinate (m = 2 when both exponents tie).
    assert e["lambda"] == pytest.approx(1 / (2 * max(e["a"], e["b"])), rel=1e-12)
    assert e["m"] == (2 if e["a"] == e["b"] else 1)


# ---------------------------------------------------------------- internal consistency


def test_deep_linear_network_with_three_widths_is_reduced_rank_regression() -> None:
    mismatches = []
    for M, H, N in itertools.product(range(1, 7), repeat=3):
        for r in range(min(M, H, N) + 1):
            dln = deep_linear_network([M, H, N], r)
            rrr = reduced_rank_regression(M, H, N, r)
            if dln[1] != rrr[1] or dln[0] != pytest.approx(rrr[0], rel=1e-12):
                mismatches.append(((M, H, N, r), dln, rrr))
    assert not mismatches


@pytest.mark.parametrize("h1, h2", [(1, 1), (3, 5), (7, 2)])
def test_deep_linear_network_with_two_widths_is_regular(h1: int, h2: int) -> None:
    # One weight matrix is identifiable whatever the true rank.
    for r in range(min(h1, h2) + 1):
        assert deep_linear_network([h1, h2], r) == regular(h1 * h2)


def test_deep_linear_network_on_a_grid_of_four_widths() -> None:
    # Aoyagi's index set must exist and be unique (else the function raises), the value is
    # invariant under transposing the product (reversing widths), and 0 <= lambda <= d/2.
    for widths in itertools.product(range(1, 5), repeat=4):
        d = sum(x * y for x, y in zip(widths, widths[1:]))
        for r in range(min(widths) + 1):
            lam, m = deep_linear_network(list(widths), r)
            assert (lam, m) == deep_linear_network(list(reversed(widths)), r)
            assert 0 <= lam <= d / 2
            assert m >= 1


def test_sum_of_powers_adds_blocks() -> None:
    assert sum_of_powers([1] * 6) == regular(6)
    assert sum_of_powers([2, 3])[0] == pytest.approx(
        sum_of_powers([2])[0] + sum_of_powers([3])[0], rel=1e-12
    )


def test_normal_crossing_target_properties() -> None:
    # Symmetric in the two coordinates, and a function of nbeta * c only.
    assert normal_crossing_target(1, 3, 1.0, 500.0) == pytest.approx(
        normal_crossing_target(3, 1, 1.0, 500.0), rel=1e-9
    )
    assert normal_crossing_target(2, 1, 4.0, 25.0) == pytest.approx(
        normal_crossing_target(2, 1, 1.0, 100.0), rel=1e-9
    )
    # As nbeta -> 0 the posterior is the uniform prior: nbeta E[K] ~ nbeta c/((2a+1)(2b+1)).
    assert normal_crossing_target(2, 3, 2.0, 1e-6) == pytest.approx(2e-6 / 35, rel=1e-5)
    # With m = 1 it approaches lambda from below as nbeta grows.
    assert 0.2498 < normal_crossing_target(1, 2, 1.0, 1e12) < 0.25


def test_docstring_examples() -> None:
    result = doctest.testmod(theory)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: regular(0), "Expected `d` to be a positive int, got 0."),
        (lambda: regular(2.0), "Expected `d` to be a positive int, got 2.0."),
        (lambda: reduced_rank_regression(0, 2, 2, 0), "Expected `M` to be a positive int, got 0."),
        (
            lambda: reduced_rank_regression(2, -1, 2, 0),
            "Expected `H` to be a positive int, got -1.",
        ),
        (
            lambda: reduced_rank_regression(2, 2, True, 0),
            "Expected `N` to be a positive int, got True.",
        ),
        (
            lambda: reduced_rank_regression(3, 3, 3, -1),
            "Expected `r` to be a non-negative int, got -1.",
        ),
        (
            lambda: reduced_rank_regression(5, 3, 4, 4),
            "Expected `r` to be an int in [0, min(M, H, N)=3], got 4.",
        ),
        (
            lambda: deep_linear_network([4], 0),
            "Expected `widths` to hold at least two positive ints, got [4].",
        ),
        (
            lambda: deep_linear_network([4, 0, 3], 0),
            "Expected `widths` to hold at least two positive ints, got [4, 0, 3].",
        ),
        (
            lambda: deep_linear_network(4, 0),
            "Expected `widths` to hold at least two positive ints, got 4.",
        ),
        (
            lambda: deep_linear_network([3, 4, 5], 5),
            "Expected `r` to be an int in [0, min(widths)=3], got 5.",
        ),
        (
            lambda: deep_linear_network([3, 4], 1.0),
            "Expected `r` to be a non-negative int, got 1.0.",
        ),
        (lambda: sum_of_powers([]), "Expected `ks` to hold at least one positive int, got []."),
        (
            lambda: sum_of_powers([1, 0]),
            "Expected `ks` to hold at least one positive int, got [1, 0].",
        ),
        (
            lambda: normal_crossing_target(0, 1, 1.0, 10.0),
            "Expected `a` to be a positive int, got 0.",
        ),
        (
            lambda: normal_crossing_target(1, 1.5, 1.0, 10.0),
            "Expected `b` to be a positive int, got 1.5.",
        ),
        (
            lambda: normal_crossing_target(1, 1, 0.0, 10.0),
            "Expected `c` to be a finite float > 0, got 0.0.",
        ),
        (
            lambda: normal_crossing_target(1, 1, 1.0, float("inf")),
            "Expected `nbeta` to be a finite float > 0, got inf.",
        ),
    ],
)
def test_invalid_arguments_raise_pinned_messages(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()
