"""Windowed statistics of the shadow chain's draws (numpy only).

A sampler emits, once per shadow step and per chain ``c``, a pair ``(d, v)``::

    d = nbeta * mean_i( l_i(w + xi) - l_i(w) )        (the LLC observation)
    v = nbeta^2 * var_i( l_i(w + xi) - l_i(w) ) / |B|  (its within-batch noise variance)

Every ``W`` draws per chain form a window, summarised by :class:`WindowSummary`:

* ``mean``: the grand mean of ``d`` over the ``C x W`` draws;
* ``se``: its standard error, with the within-chain autocorrelation accounted for
  (chains are independent, draws within a chain are not)::

      se = sqrt( sum_c s2_c / ess_c ) / C

  where ``s2_c`` is chain c's variance and ``ess_c`` its effective sample size
  (:func:`effective_sample_size`);
* the Gamma channel. At equilibrium ``d`` is approximately Gamma with mean ``lambda*T`` and
  variance ``lambda*T^2`` plus batch noise of variance ``v``, so::

      var_channel = var(d) - mean(v)
      ratio       = mean(d)^2 / var_channel   (~ lambda, temperature-free)
      consistency = var_channel / mean(d)     (~ T; ~1 for a well-tuned chain)

``mean`` and ``se`` are never NaN; the diagnostics (``lag1``, ``var_draw``, ``var_channel``,
``ratio``, ``consistency``) may be NaN where they are undefined.

:class:`WindowStats` is the stateful, constant-memory front end: feed it one draw per chain with
:meth:`WindowStats.update`, it returns a summary every ``W`` draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Any, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from online_llc.errors import check_nonneg_int, check_positive_int

__all__ = [
    "WindowSummary",
    "WindowStats",
    "effective_sample_size",
    "mean_standard_error",
    "summarize",
]

# Below this many draws a chain's autocorrelation cannot be estimated at all (Geyer's sequence
# would hold one or two noisy pairs); such chains are treated as independent draws. This is
# anti-conservative for correlated chains, which is why windows should be >> the correlation time.
_MIN_DRAWS_FOR_ACF = 8

_STATE_VERSION = 1
_STATE_KEYS = frozenset(
    {"version", "window", "num_chains", "horizon", "count", "d", "v", "f", "past", "start_step", "last_step"}
)


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Biased (1/n) autocovariances ``gamma_k``, k = 0..n-1, of a 1-D series, via FFT."""
    n = x.shape[0]
    centered = x - x.mean()
    # Zero-pad to >= 2n so the circular correlation equals the linear one.
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centered, size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), size)[:n] / n
    return acov


def _chain_moments(x: np.ndarray) -> tuple[float, float]:
    """Variance of one chain's draws and the variance of its mean.

    Returns ``(s2, vm)``: ``s2`` estimates the stationary variance of a draw and ``vm`` the
    variance of the chain's sample mean, with ``1 <= s2 / vm <= n`` (``s2 / vm`` is the ESS).
    For ``n == 1`` returns ``(nan, nan)``; for a constant chain ``(0.0, 0.0)``.

    Method (Geyer 1992, initial monotone sequence). With ``gamma_k`` the 1/n autocovariances and
    pair sums ``G_m = gamma_{2m} + gamma_{2m+1}``, keep ``G_0..G_{M-1}`` up to the first
    non-positive one, make them non-increasing, and set::

        sigma2 = -gamma_0 + 2 * sum_{m<M} G_m      (asymptotic variance, n * Var(mean))
        vm     = sigma2 / max(n - 2M, n/2)
        s2     = gamma_0 + vm
    """
    n = x.shape[0]
    if n == 1:
        return math.nan, math.nan
    acov = _autocovariance(x)
    gamma0 = float(acov[0])
    if not gamma0 > 0.0:
        # Constant chain: no spread, no uncertainty about its mean.
        return 0.0, 0.0
    if n < _MIN_DRAWS_FOR_ACF:
        # Independent-draws fallback: s2 is the ddof=1 variance, vm = s2 / n, ESS = n.
        vm = gamma0 / (n - 1)
        return gamma0 + vm, vm

    num_pairs = n // 2
    pairs = acov[0 : 2 * num_pairs : 2] + acov[1 : 2 * num_pairs : 2]
    non_positive = np.flatnonzero(pairs <= 0.0)
    num_kept = int(non_positive[0]) if non_positive.size else num_pairs
    kept = np.minimum.accumulate(pairs[:num_kept])
    sigma2 = max(-gamma0 + 2.0 * float(kept.sum()), 0.0)

    # Why not sigma2 / n: the centred autocovariances sum to exactly zero over all lags, so each
    # gamma_k is biased down by about Var(mean) and a sum over the 2M lags 0..2M-1 (each counted
    # twice but gamma_0) loses about (4M - 1) Var(mean). Undoing the full amount over-corrects,
    # because the adaptive cut-off M is placed where the noise happened to be positive, and
    # those lags are biased up. Dividing by n - 2M undoes about half of it (a calibration, not
    # a theorem). Simulated AR(1) windows of n = 200 (20 seeds x 1000 windows, 1 and 2 chains)
    # put mean(vm) at +13..+16% of the exact Var(mean) for independent draws (Geyer keeps
    # positive noise pairs; the ESS <= n clip below adds ~4 points), +5..+9% at phi = 0.5 and
    # -10..-2% at phi = 0.9 (n ~ 10 tau), where plain sigma2 / n is ~20% low. Shorter windows
    # are worse: -22% at n = 5 tau. See tests/test_window.py.
    # The n/2 floor caps the correction at 2x for chains that barely decorrelate.
    vm = sigma2 / max(n - 2 * num_kept, n / 2)
    # Clip so that ESS = s2 / vm <= n: never report less uncertainty than for independent draws
    # (antithetic chains could otherwise claim ESS > n on noise).
    vm = max(vm, gamma0 / (n - 1))
    # E[gamma_0] = Var(draw) - Var(mean) exactly for a stationary series, so adding vm back gives
    # an (approximately) unbiased variance of a draw; for independent draws it is the ddof=1
    # variance up to O(1/n^2).
    s2 = gamma0 + vm
    return s2, vm


def _ess(s2: float, vm: float, n: int) -> float:
    """ESS ``s2 / vm`` clipped to ``[1, n]``; ``n`` when the mean is known exactly (``vm == 0``)."""
    if not vm > 0.0:
        return float(n)
    return float(min(max(s2 / vm, 1.0), n))


def _as_draws(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` as a finite float64 array of shape [C, W] (a 1-D input is one chain)."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected `{name}` to be a numeric array of shape [chains, draws], got {values!r}."
        ) from None
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(
            f"Expected `{name}` to be a non-empty array of shape [chains, draws], "
            f"got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"Expected `{name}` to be finite, got {int(np.sum(~np.isfinite(arr)))} non-finite "
            "value(s). Filter out non-finite draws (diverged chains) before computing statistics."
        )
    return arr


def effective_sample_size(x: ArrayLike) -> float:
    """Effective sample size of one chain's draws.

    ``ESS = n / tau`` with ``tau`` the integrated autocorrelation time, estimated by Geyer's
    initial monotone sequence (see ``_chain_moments`` for the finite-sample correction), and
    clipped to ``[1, n]``. A constant chain has ``ESS = n``; a chain shorter than 8 draws is
    treated as independent (``ESS = n``): its autocorrelation cannot be estimated.

    Args:
        x: the chain's draws, 1-D, finite, in sampling order.

    Returns:
        The ESS as a float in ``[1, len(x)]``.

    Raises:
        ValueError: if ``x`` is not a non-empty, finite 1-D array.
    """
    arr = _as_draws("x", x)
    if np.ndim(x) != 1:
        raise ValueError(f"Expected `x` to be a 1-D array (one chain), got shape {np.shape(x)}.")
    arr = arr[0]
    s2, vm = _chain_moments(arr)
    return _ess(s2, vm, arr.shape[0])


def _standard_error_from(chain_vm: np.ndarray, draws: np.ndarray) -> float:
    """se of the grand mean from per-chain ``Var(mean)``s, with the one-draw-per-chain fallback."""
    num_chains, width = draws.shape
    if width >= 2:
        return float(math.sqrt(float(chain_vm.sum())) / num_chains)
    # One draw per chain: nothing within a chain to go on, but chains are independent, so the
    # spread between them is an honest (if noisy) estimate of a draw's variance.
    if num_chains >= 2:
        return float(math.sqrt(float(np.var(draws[:, 0], ddof=1)) / num_chains))
    # A single draw says nothing about its own uncertainty: an infinite se tells a filter to
    # ignore the observation, which is the truthful answer (NaN is never returned for se).
    return math.inf


def mean_standard_error(draws: ArrayLike) -> float:
    """Standard error of the grand mean of ``C`` independent, autocorrelated chains.

    ``se = sqrt( sum_c s2_c / ess_c ) / C``, where ``s2_c / ess_c`` is chain c's estimated
    variance of its own mean (Geyer's initial monotone sequence, see :func:`effective_sample_size`).
    This is not the naive ``std / sqrt(C * W)``, which for lag-1 autocorrelation 0.9 is about
    ``sqrt(19)`` ~ 4.4x too small.

    With one draw per chain (``W == 1``) the between-chain spread is used
    (``std(ddof=1) / sqrt(C)``); with a single draw in all, ``se`` is ``inf``.

    Args:
        draws: array of shape ``[C, W]`` (C chains, W consecutive draws each); a 1-D array is
            one chain.

    Returns:
        The standard error as a float (never NaN; ``0.0`` for constant chains).

    Raises:
        ValueError: if ``draws`` is empty, not 1-D/2-D, or not finite.
    """
    arr = _as_draws("draws", draws)
    chain_vm = np.array([_chain_moments(row)[1] for row in arr])
    return _standard_error_from(chain_vm, arr)


@dataclass(frozen=True)
class WindowSummary:
    """Statistics of one window of draws (``C`` chains x ``W`` draws).

    Attributes:
        start_step: training step of the window's first draw.
        end_step: training step of the window's last draw.
        n_draws: ``C * W``.
        mean: grand mean of ``d``, the window's LLC observation. Never NaN.
        se: standard error of ``mean`` (autocorrelation-aware, see :func:`mean_standard_error`),
            including the ``var_of_mean_floor`` when one was given.
        se_window: the same from the window's own draws only (equal to ``se`` without a floor).
            Never NaN; ``inf`` only for a single draw.
        ess: total effective sample size, ``sum_c ess_c``.
        lag1: lag-1 autocorrelation pooled over chains (NaN if ``W < 2`` or the draws are
            constant).
        var_draw: variance of one draw ``d``, pooled over chains: the mean over chains of
            ``gamma_0 + Var(mean)`` (unbiased under autocorrelation, see ``_chain_moments``;
            the ddof=1 variance for independent draws). For ``W == 1`` the between-chain
            variance; NaN for a single draw.
        mean_noise_var: mean of ``v``, the within-batch noise variance of ``d``.
        var_channel: ``var_draw - mean_noise_var``; may be negative when batch noise dominates.
        ratio: ``mean**2 / var_channel`` (~ lambda); NaN when ``var_channel <= 0``.
        consistency: ``var_channel / mean`` (~ T); NaN when ``mean <= 0``.
        diverged_draws: draws flagged as placeholders for a reset chain (see
            :meth:`WindowStats.update`), over all chains (all ranks with ``gather``).
        warmup_draws: draws flagged as coming from a chain still warming up.
        dropped_draws: warm-up draws left out because the chains' trailing healthy draws
            covered at least half the window (the summary then describes those draws only).
    """

    start_step: int
    end_step: int
    n_draws: int
    mean: float
    se: float
    se_window: float
    ess: float
    lag1: float
    var_draw: float
    mean_noise_var: float
    var_channel: float
    ratio: float
    consistency: float
    diverged_draws: int = 0
    warmup_draws: int = 0
    dropped_draws: int = 0

    def to_dict(self) -> dict[str, int | float]:
        """The fields as a dict of plain Python ``int`` (steps, n_draws) and ``float`` values."""
        out: dict[str, int | float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            ints = ("start_step", "end_step", "n_draws", "diverged_draws", "warmup_draws")
            out[f.name] = int(value) if f.name in ints else float(value)
        return out


def summarize(
    draws: ArrayLike,
    noise_vars: ArrayLike,
    *,
    start_step: int = 0,
    end_step: int | None = None,
    var_of_mean_floor: ArrayLike | None = None,
) -> WindowSummary:
    """Summarise one window of draws.

    Args:
        draws: LLC observations ``d``, shape ``[C, W]`` (a 1-D array is one chain), finite.
        noise_vars: their within-batch noise variances ``v``, same shape, finite and ``>= 0``.
        start_step: training step of the first draw.
        end_step: training step of the last draw; defaults to ``start_step + W - 1``.
        var_of_mean_floor: optional per-chain lower bound on the variance of each chain's
            window mean, shape ``[C]`` (see :class:`WindowStats`'s ``horizon``: correlation
            slower than a window is invisible inside it).

    Returns:
        The :class:`WindowSummary` (see its attributes for every formula).

    Raises:
        ValueError: for non-finite or mismatched inputs, negative ``noise_vars``, or steps that
            are not non-negative ints with ``end_step >= start_step``.
    """
    d = _as_draws("draws", draws)
    v = _as_draws("noise_vars", noise_vars)
    if v.shape != d.shape:
        raise ValueError(
            f"Expected `noise_vars` to have the shape of `draws` {d.shape}, got {v.shape}."
        )
    if np.any(v < 0.0):
        raise ValueError(
            f"Expected `noise_vars` to be >= 0, got minimum {float(v.min())!r}."
        )
    start_step = check_nonneg_int("start_step", _plain_int(start_step))
    num_chains, width = d.shape
    if end_step is None:
        end_step = start_step + width - 1
    end_step = check_nonneg_int("end_step", _plain_int(end_step))
    if end_step < start_step:
        raise ValueError(
            f"Expected `end_step` to be >= start_step ({start_step}), got {end_step!r}."
        )

    moments = np.array([_chain_moments(row) for row in d])  # [C, 2]: s2_c, vm_c
    se_window = _standard_error_from(moments[:, 1], d)
    if var_of_mean_floor is not None:
        floor = np.asarray(var_of_mean_floor, dtype=np.float64).reshape(-1)
        if floor.shape != (num_chains,) or not np.all(np.isfinite(floor)) or np.any(floor < 0):
            raise ValueError(
                f"Expected `var_of_mean_floor` to be {num_chains} finite floats >= 0, got {var_of_mean_floor!r}."
            )
        moments[:, 1] = np.maximum(moments[:, 1], floor)
    mean = float(d.mean())
    se = _standard_error_from(moments[:, 1], d)

    if width >= 2:
        var_draw = float(moments[:, 0].mean())
        ess = float(sum(_ess(float(s2), float(vm), width) for s2, vm in moments))
        centered = d - d.mean(axis=1, keepdims=True)
        denom = float(np.sum(centered * centered))
        lag1 = float(np.sum(centered[:, :-1] * centered[:, 1:]) / denom) if denom > 0.0 else math.nan
    else:
        # One draw per chain: draws are independent across chains.
        var_draw = float(np.var(d[:, 0], ddof=1)) if num_chains >= 2 else math.nan
        ess = float(num_chains)
        lag1 = math.nan

    mean_noise_var = float(v.mean())
    var_channel = var_draw - mean_noise_var
    # The Gamma channel is undefined when batch noise swamps the chain's own spread
    # (var_channel <= 0) or when the LLC observation is not positive; NaN says so rather than
    # a huge or negative number that could be mistaken for a measurement.
    ratio = mean * mean / var_channel if var_channel > 0.0 else math.nan
    consistency = var_channel / mean if mean > 0.0 else math.nan

    return WindowSummary(
        start_step=start_step,
        end_step=end_step,
        n_draws=int(d.size),
        mean=mean,
        se=float(se),
        se_window=float(se_window),
        ess=ess,
        lag1=lag1,
        var_draw=float(var_draw),
        mean_noise_var=mean_noise_var,
        var_channel=float(var_channel),
        ratio=float(ratio),
        consistency=float(consistency),
    )


def _plain_int(value: Any) -> Any:
    """numpy integers as Python ints (so the validators accept them); anything else unchanged."""
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------------
# Stateful front end
# --------------------------------------------------------------------------------------------------


class WindowStats:
    """Collects one draw per chain per call and summarises every ``window`` draws.

    Memory is constant: the current window's draws (two ``[num_chains, window]`` buffers) and
    the draws of the previous ``horizon - 1`` windows.

    A chain can have modes slower than one window (a singular model's flat directions, confined
    only by the localization): inside a window they look like a constant offset, so a
    within-window ``se`` misses them and consecutive window means are correlated. With
    ``horizon > 1`` the chain's asymptotic variance ``sigma^2 = n Var(mean)`` is also estimated
    over the last ``horizon`` windows (``n = horizon * W`` draws), and each chain's variance of
    its window mean is at least ``min(sigma^2 / W, Var(draw))``.

    Args:
        window: draws per chain in a window (``W``). Should be well above the chains'
            autocorrelation time (``ess`` in the summaries shows it) for a calibrated ``se``.
        num_chains: number of chains (``C``), one draw each per :meth:`update`.
        horizon: number of windows (the current one included) over which slow correlation is
            estimated; 1 uses the current window alone.
        gather: for distributed training, a collective ``f(array[3, C, W]) -> array[3, C', W]``
            that concatenates every rank's draws (row 0), noise variances (row 1) and flags
            (row 2, see :meth:`update`) along the chain axis, identically on every rank. Windows are then summarised over all ranks'
            chains, so every rank computes the same summary. It must be called on every rank at
            the same window, which holds when all ranks update at the same steps.

    Raises:
        ValueError: if ``window``, ``num_chains`` or ``horizon`` is not a positive int.
    """

    def __init__(
        self,
        window: int,
        num_chains: int = 1,
        horizon: int = 1,
        gather: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.gather = gather
        self.window = check_positive_int("window", window)
        self.num_chains = check_positive_int("num_chains", num_chains)
        self.horizon = check_positive_int("horizon", horizon)
        self._past: list[np.ndarray] = []  # previous windows' draws, oldest first, each [C, <= W]
        self._d = np.empty((self.num_chains, self.window), dtype=np.float64)
        self._v = np.empty((self.num_chains, self.window), dtype=np.float64)
        self._f = np.zeros((self.num_chains, self.window), dtype=np.float64)  # flags, see update()
        self._count = 0
        self._start_step: int | None = None
        self._last_step: int | None = None

    @property
    def num_pending(self) -> int:
        """Draws per chain collected in the current, unfinished window (``0 .. window - 1``)."""
        return self._count

    def reset(self) -> None:
        """Drop the current window's draws and the past windows, and forget the last step."""
        self._count = 0
        self._start_step = None
        self._last_step = None
        self._past = []

    def clear_history(self) -> None:
        """Forget the past windows (after a jump or a chain reset they describe another state)."""
        self._past = []

    def drop_pending(self) -> None:
        """Discard the current, unfinished window (keeps the past windows and the last step)."""
        self._count = 0
        self._start_step = None

    def _floor(self, current: np.ndarray) -> np.ndarray | None:
        if self.horizon <= 1 or not self._past or self._past[-1].shape[0] != current.shape[0]:
            return None
        joined = np.concatenate(self._past + [current], axis=1)
        n = joined.shape[1]
        floor = np.zeros(current.shape[0])
        for c in range(current.shape[0]):
            s2, vm = _chain_moments(joined[c])
            if math.isfinite(vm) and vm > 0:
                floor[c] = min(n * vm / self.window, s2)
        return floor

    def _as_row(self, name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
        expected = f"a sequence of {self.num_chains} finite floats (one per chain)"
        try:
            row = np.atleast_1d(np.asarray(values, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(f"Expected `{name}` to be {expected}, got {values!r}.") from None
        if row.ndim != 1 or row.shape[0] != self.num_chains:
            raise ValueError(f"Expected `{name}` to be {expected}, got shape {row.shape}.")
        if not np.all(np.isfinite(row)):
            raise ValueError(
                f"Expected `{name}` to be finite, got {row.tolist()!r}. A non-finite draw means "
                "the chain diverged: the caller must filter it out (and reset that chain) "
                "before calling update."
            )
        return row

    def update(
        self,
        d: Sequence[float] | np.ndarray,
        v: Sequence[float] | np.ndarray,
        step: int,
        flags: Sequence[int] | None = None,
    ) -> WindowSummary | None:
        """Add one draw per chain.

        Args:
            d: the LLC observations, one per chain, finite.
            v: their within-batch noise variances, one per chain, finite and ``>= 0``.
            step: the training step of this draw (non-negative, non-decreasing across calls).
            flags: per chain, 0 for a healthy draw, 1 for a placeholder standing in for a chain
                that was just reset (its draw is meaningless, but every rank must still add a
                draw so that windows close, and their collective runs, at the same step), 2 for
                a draw from a chain still warming up. The window's summary counts them
                (``diverged_draws``, ``warmup_draws``), over all ranks when gathered, so every
                rank reaches the same verdict about the window.

        Returns:
            The window's :class:`WindowSummary` when this call completes a window (the buffer
            is then emptied for the next window), else ``None``.

        Raises:
            ValueError: wrong length or non-finite ``d``/``v``, negative ``v``, or a ``step``
                that is negative, not an int, or before the previous step. The state is left
                unchanged.
        """
        d_row = self._as_row("d", d)
        v_row = self._as_row("v", v)
        if np.any(v_row < 0.0):
            raise ValueError(f"Expected `v` to be >= 0 (a variance), got {v_row.tolist()!r}.")
        step = check_nonneg_int("step", _plain_int(step))
        if self._last_step is not None and step < self._last_step:
            raise ValueError(
                f"Expected `step` to be >= the previous step ({self._last_step}), got {step!r}."
            )

        if flags is None:
            f_row = np.zeros(self.num_chains)
        else:
            f_row = np.asarray(flags, dtype=np.float64).reshape(-1)
            if f_row.shape != (self.num_chains,) or not np.all(np.isin(f_row, (0, 1, 2))):
                raise ValueError(f"Expected `flags` to be {self.num_chains} values in {{0, 1, 2}}, got {flags!r}.")
        self._d[:, self._count] = d_row
        self._v[:, self._count] = v_row
        self._f[:, self._count] = f_row
        if self._count == 0:
            self._start_step = step
        self._count += 1
        self._last_step = step
        if self._count < self.window:
            return None

        assert self._start_step is not None
        d_all, v_all, f_all = self._d, self._v, self._f
        if self.gather is not None:
            # One collective for all three arrays: every rank gets every rank's chains, in rank order.
            packed = np.asarray(self.gather(np.stack([self._d, self._v, self._f])), dtype=np.float64)
            if packed.ndim != 3 or packed.shape[0] != 3 or packed.shape[2] != self.window:
                raise ValueError(
                    f"Expected `gather` to return an array of shape [3, chains, {self.window}], got {packed.shape}."
                )
            d_all, v_all, f_all = packed[0], packed[1], packed[2]
        # A chain that finished warming up inside this window: when no draw is a reset
        # placeholder and every chain's trailing run of healthy draws covers at least half the
        # window, the window is summarised on those last draws alone (the same number from every
        # chain), so an equilibrated half-window is not thrown away with its warm-up head.
        healthy = f_all == 0
        tail = np.argmin(healthy[:, ::-1], axis=1)
        tail[healthy.all(axis=1)] = self.window
        keep = int(tail.min())
        dropped = 0
        if not np.any(f_all == 1) and np.any(f_all == 2) and 2 * keep >= self.window:
            dropped = int(f_all.size - keep * f_all.shape[0])
            d_all, v_all, f_all = d_all[:, -keep:], v_all[:, -keep:], f_all[:, -keep:]
        summary = summarize(
            d_all, v_all, start_step=self._start_step, end_step=step, var_of_mean_floor=self._floor(d_all)
        )
        summary = replace(
            summary,
            diverged_draws=int(np.sum(f_all == 1)),
            warmup_draws=int(np.sum(f_all == 2)),
            dropped_draws=dropped,
        )
        if self.horizon > 1:
            self._past = (self._past + [d_all.copy()])[-(self.horizon - 1) :]
        self._count = 0
        self._start_step = None
        return summary

    def state_dict(self) -> dict[str, Any]:
        """The state as plain Python ints, floats, lists and ``None`` (safe for
        ``torch.load(weights_only=True)``); only the pending draws are stored."""
        return {
            "version": _STATE_VERSION,
            "window": int(self.window),
            "num_chains": int(self.num_chains),
            "count": int(self._count),
            "d": self._d[:, : self._count].tolist(),
            "f": self._f[:, : self._count].tolist(),
            "horizon": int(self.horizon),
            "past": [p.tolist() for p in self._past],
            "v": self._v[:, : self._count].tolist(),
            "start_step": None if self._start_step is None else int(self._start_step),
            "last_step": None if self._last_step is None else int(self._last_step),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly; validated fully before anything changes.

        Raises:
            KeyError: if keys are missing or unexpected.
            ValueError: if ``window`` or ``num_chains`` differ from this object's, or the
                pending draws are inconsistent with ``count``.
        """
        missing = sorted(_STATE_KEYS - set(state))
        unexpected = sorted(set(state) - _STATE_KEYS)
        if missing or unexpected:
            raise KeyError(
                f"WindowStats state dict: missing keys {missing}, unexpected keys {unexpected}."
            )
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"Expected `state['version']` to be {_STATE_VERSION}, got {state['version']!r}."
            )
        for key, own in (("window", self.window), ("num_chains", self.num_chains), ("horizon", self.horizon)):
            if state[key] != own:
                raise ValueError(
                    f"Expected `state['{key}']` to be {own} (this WindowStats' {key}), "
                    f"got {state[key]!r}."
                )
        count = state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < self.window:
            raise ValueError(
                f"Expected `state['count']` to be an int in [0, {self.window - 1}], got {count!r}."
            )
        shape = (self.num_chains, count)
        arrays = {}
        for key in ("d", "v", "f"):
            expected = f"{self.num_chains} lists of {count} floats (one per chain)"
            try:
                arr = np.asarray(state[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"Expected `state['{key}']` to be {expected}.") from None
            if arr.shape != shape and not (count == 0 and arr.size == 0):
                raise ValueError(f"Expected `state['{key}']` to be {expected}, got shape {arr.shape}.")
            arr = arr.reshape(shape)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"Expected `state['{key}']` to be finite.")
            arrays[key] = arr
        steps = {}
        for key in ("start_step", "last_step"):
            value = state[key]
            if value is not None:
                check_nonneg_int(f"state['{key}']", value)
            steps[key] = value
        start, last = steps["start_step"], steps["last_step"]
        if start is not None and (last is None or last < start):
            raise ValueError(
                f"Expected `state['last_step']` to be >= start_step ({start}), got {last!r}."
            )
        if (count > 0) != (start is not None):
            raise ValueError(
                f"Expected `state['start_step']` to be set exactly when `count` > 0, "
                f"got start_step={steps['start_step']!r} with count={count}."
            )

        past = []
        for p in state["past"]:
            arr = np.asarray(p, dtype=np.float64)
            # With `gather` the past windows hold every rank's chains: any chain count >= ours.
            # A window summarised on its trailing half holds from window / 2 draws per chain.
            if (
                arr.ndim != 2
                or not 2 * arr.shape[1] >= self.window
                or arr.shape[1] > self.window
                or arr.shape[0] < self.num_chains
                or not np.all(np.isfinite(arr))
            ):
                raise ValueError(
                    f"Expected `state['past']` to hold finite arrays of shape [chains >= {self.num_chains}, "
                    f"window / 2 .. {self.window}]."
                )
            past.append(arr)
        if len(past) > max(self.horizon - 1, 0):
            raise ValueError(f"Expected `state['past']` to hold at most {self.horizon - 1} windows, got {len(past)}.")

        self._past = past
        self._d[:, :count] = arrays["d"]
        self._v[:, :count] = arrays["v"]
        self._f[:, :count] = arrays["f"]
        self._count = count
        self._start_step = steps["start_step"]
        self._last_step = steps["last_step"]
