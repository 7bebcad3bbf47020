"""Theoretical learning coefficients: the values an LLC estimate is checked against.

Singular Learning Theory (Watanabe 2009, *Algebraic Geometry and Statistical Learning
Theory*) writes the Bayes free energy at the true parameter as

    F_n = n L_n(w0) + lambda log n - (m - 1) log log n + O_p(1),

where ``lambda`` is the learning coefficient (real log canonical threshold) and ``m`` its
multiplicity (the order of the largest pole of the zeta function). Every function here
returns ``(lambda, m)`` in closed form for a model whose value is known, so that tests,
demos and benchmarks compare estimates with an oracle instead of a snapshot.

``lambda`` is computed in exact rational arithmetic and converted to ``float`` once.
This module imports no torch; :func:`normal_crossing_target` imports scipy when called.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence

from online_llc.errors import (
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "regular",
    "reduced_rank_regression",
    "deep_linear_network",
    "sum_of_powers",
    "normal_crossing_target",
]


def regular(d: int) -> tuple[float, int]:
    """Learning coefficient of a regular (identifiable, positive-definite Fisher) model.

    lambda = d / 2 and m = 1: the free energy reduces to the BIC (Watanabe 2009).

    Args:
        d: number of parameters.

    Returns:
        ``(lambda, m)``.

    Raises:
        ValueError: if ``d`` is not a positive int.

    Example:
        >>> regular(10)
        (5.0, 1)
    """
    check_positive_int("d", d)
    return d / 2, 1


def reduced_rank_regression(M: int, H: int, N: int, r: int) -> tuple[float, int]:
    """Learning coefficient of reduced-rank regression ``y = B A x``.

    Aoyagi & Watanabe (2005), "Stochastic complexities of reduced rank regression in
    Bayesian estimation", Neural Networks 18(7), Main Theorem. ``x`` is in R^M, ``A`` is
    H x M, ``B`` is N x H and the true product ``B0 A0`` has rank ``r``. The four cases
    are exhaustive and mutually exclusive because ``r <= min(M, H, N)``:

    1. N + r <= M + H, M + r <= N + H and H + r <= M + N:
       lambda = (2(H + r)(M + N) - (M - N)^2 - (H + r)^2 + s) / 8, where s = 0 and
       m = 1 if M + H + N + r is even, s = 1 and m = 2 if it is odd;
    2. M + H < N + r: lambda = (H M - H r + N r) / 2, m = 1;
    3. N + H < M + r: lambda = (H N - H r + M r) / 2, m = 1;
    4. M + N < H + r: lambda = M N / 2, m = 1.

    This is :func:`deep_linear_network` with ``widths = [M, H, N]``.

    Args:
        M: input dimension.
        H: hidden width (the rank bound of the model).
        N: output dimension.
        r: rank of the true product, ``0 <= r <= min(M, H, N)``.

    Returns:
        ``(lambda, m)``.

    Raises:
        ValueError: if a size is not a positive int or ``r`` is out of range.

    Example:
        >>> reduced_rank_regression(6, 6, 6, 3)
        (17.0, 2)
    """
    for name, value in (("M", M), ("H", H), ("N", N)):
        check_positive_int(name, value)
    _check_rank(r, "min(M, H, N)", min(M, H, N))

    if M + H < N + r:
        lam = Fraction(H * M - H * r + N * r, 2)
        m = 1
    elif N + H < M + r:
        lam = Fraction(H * N - H * r + M * r, 2)
        m = 1
    elif M + N < H + r:
        lam = Fraction(M * N, 2)
        m = 1
    else:
        odd = (M + H + N + r) % 2
        lam = Fraction(2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2 + odd, 8)
        m = 2 if odd else 1
    return float(lam), m


def deep_linear_network(widths: Sequence[int], r: int) -> tuple[float, int]:
    """Learning coefficient of a deep linear network ``y = W_L ... W_1 x``.

    Aoyagi (2024), "Consideration on the learning efficiency of multiple-layered neural
    networks with linear units", Neural Networks (2024) 106132, Theorem 1 (restated in
    Lau, Furman, Wang, Murfet & Wei 2024, "The local learning coefficient: a
    singularity-aware complexity measure", appendix on deep linear networks). ``W_j`` is
    H_{j+1} x H_j, ``widths = [H_1, ..., H_{L+1}]`` and the true product has rank ``r``.

    Let M_j = H_j - r. There is a unique set S of l + 1 indices (l >= 1) with

        max_{j in S} M_j <  min_{k not in S} M_k,
        sum_{j in S} M_j >= l * max_{j in S} M_j,
        sum_{j in S} M_j <  l * min_{k not in S} M_k   (min over an empty set = +inf).

    With M = ceil(sum_S M_j / l) - 1 and a = sum_S M_j - l M (so 1 <= a <= l),

        lambda = (-r^2 + r (H_1 + H_{L+1})) / 2 + a (l - a) / (4 l)
                 - l (l - 1) / 4 * (sum_S M_j / l)^2 + 1/2 sum_{i < j in S} M_i M_j,
        m      = a (l - a) + 1.

    For three widths this is :func:`reduced_rank_regression`; for two it is
    :func:`regular` with d = H_1 H_2.

    Args:
        widths: layer widths, input first and output last; at least two positive ints.
        r: rank of the true product, ``0 <= r <= min(widths)``.

    Returns:
        ``(lambda, m)``.

    Raises:
        ValueError: if ``widths`` is not at least two positive ints or ``r`` is out of
            range.

    Example:
        >>> deep_linear_network([6, 6, 6, 6, 6], 3)
        (16.5, 4)
    """
    ws = _check_int_list("widths", widths, minimum_length=2, accepted="at least two positive ints")
    _check_rank(r, "min(widths)", min(ws))

    reduced = sorted(w - r for w in ws)
    # Condition 1 forces S to be the l + 1 smallest M_j, so only its size is searched.
    sizes = _aoyagi_set_sizes(reduced)
    if len(sizes) != 1:  # Aoyagi's theorem guarantees exactly one; reaching here is a bug.
        raise RuntimeError(f"Found {len(sizes)} index sets for widths={ws}, r={r}; expected 1.")
    selected = reduced[: sizes[0]]
    l = len(selected) - 1
    total = sum(selected)
    a = total - l * (-(-total // l) - 1)  # -(-x // l) is ceil(x / l) on ints
    pairs = (total * total - sum(x * x for x in selected)) // 2  # sum_{i<j} M_i M_j

    lam = (
        Fraction(-r * r + r * (ws[0] + ws[-1]), 2)
        + Fraction(a * (l - a), 4 * l)
        - Fraction(l * (l - 1), 4) * Fraction(total, l) ** 2
        + Fraction(pairs, 2)
    )
    return float(lam), a * (l - a) + 1


def sum_of_powers(ks: Sequence[int]) -> tuple[float, int]:
    """Learning coefficient of ``K(w) = sum_j w_j^(2 k_j)``.

    lambda = sum_j 1 / (2 k_j), m = 1. The one-dimensional ``w^(2k)`` has lambda = 1/(2k)
    and m = 1; for K1(u) + K2(v) in disjoint variables lambda = lambda1 + lambda2 and
    m = m1 + m2 - 1 (Watanabe 2009), so the multiplicity stays 1.

    Args:
        ks: the exponents k_j; at least one positive int.

    Returns:
        ``(lambda, m)``.

    Raises:
        ValueError: if ``ks`` is not at least one positive int.

    Example:
        >>> sum_of_powers([1, 1, 2, 2])
        (1.5, 1)
    """
    exps = _check_int_list("ks", ks, minimum_length=1, accepted="at least one positive int")
    return float(sum(Fraction(1, 2 * k) for k in exps)), 1


def normal_crossing_target(a: int, b: int, c: float, nbeta: float) -> float:
    """What a perfect sampler's LLC estimate converges to at a finite ``nbeta``.

    For K(w) = c w1^(2a) w2^(2b) on [-1, 1]^2 with a uniform prior and the tempered
    posterior p(w) ∝ exp(-nbeta K(w)), returns nbeta * E_p[K]. The model has
    lambda = 1 / (2 max(a, b)) with m = 2 when a = b and m = 1 otherwise; at finite
    ``nbeta`` the target sits below lambda, and the gap closes only like 1/log(nbeta)
    when m = 2.

    The w2 integral is done in closed form: with p = 1/(2b), s = nbeta c w1^(2a) and
    P the regularized lower incomplete gamma function,

        int_0^1 exp(-s y^(2b)) dy         = Gamma(p + 1) s^(-p) P(p, s),
        int_0^1 s y^(2b) exp(-s y^(2b)) dy = p Gamma(p + 1) s^(-p) P(p + 1, s),

    and the w1 integral numerically (scipy ``quad``; relative error well below 1e-6).

    Args:
        a: exponent of w1 (positive int).
        b: exponent of w2 (positive int).
        c: scale of K (finite float > 0).
        nbeta: inverse temperature n * beta (finite float > 0).

    Returns:
        nbeta * E[K] under the tempered posterior.

    Raises:
        ValueError: for a non-positive or non-int exponent, or a non-positive or
            non-finite ``c`` or ``nbeta``.
    """
    check_positive_int("a", a)
    check_positive_int("b", b)
    c = check_positive_float("c", c)
    nbeta = check_positive_float("nbeta", nbeta)
    # Imported here so that `import online_llc.models.theory` stays free of scipy's start-up cost.
    from scipy import integrate, special

    t = nbeta * c
    p = 1.0 / (2 * b)
    g = special.gamma(p + 1)

    def inner(x: float) -> tuple[float, float]:
        s = t * x ** (2 * a)
        if s < 1e-300:  # s^(-p) P(p, s) -> 1 / Gamma(p + 1) as s -> 0
            return 1.0, 0.0
        sp = s ** (-p)
        return g * sp * special.gammainc(p, s), p * g * sp * special.gammainc(p + 1, s)

    # Both integrands change on the scale x_c = t^(-1/(2a)), where s = 1; splitting [0, 1]
    # at multiples of x_c keeps quad accurate however large nbeta is.
    x_c = t ** (-1.0 / (2 * a))
    edges = sorted({0.0, 1.0, *(x_c * 10.0**k for k in range(-3, 4) if 0.0 < x_c * 10.0**k < 1.0)})
    den = num = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        den += integrate.quad(lambda x: inner(x)[0], lo, hi, epsabs=0.0, epsrel=1e-10, limit=200)[0]
        num += integrate.quad(lambda x: inner(x)[1], lo, hi, epsabs=0.0, epsrel=1e-10, limit=200)[0]
    return num / den


def _aoyagi_set_sizes(reduced_sorted: list[int]) -> list[int]:
    """Sizes l + 1 for which the l + 1 smallest M_j satisfy Aoyagi's three conditions."""
    sizes = []
    for size in range(2, len(reduced_sorted) + 1):  # l = 0 fails the third condition
        l = size - 1
        inside = reduced_sorted[:size]
        rest_min = reduced_sorted[size] if size < len(reduced_sorted) else math.inf
        total = sum(inside)
        if inside[-1] < rest_min and total >= l * inside[-1] and total < l * rest_min:
            sizes.append(size)
    return sizes


def _check_rank(r: Any, bound_name: str, bound: int) -> None:
    check_nonneg_int("r", r)
    if r > bound:
        raise ValueError(f"Expected `r` to be an int in [0, {bound_name}={bound}], got {r!r}.")


def _check_int_list(name: str, value: Any, *, minimum_length: int, accepted: str) -> list[int]:
    """Return ``value`` as a list of positive ints, or raise the template's ``ValueError``."""
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    items = list(value) if ok else []
    ok = ok and len(items) >= minimum_length and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items
    )
    if not ok:
        raise ValueError(f"Expected `{name}` to hold {accepted}, got {value!r}.")
    return items
