"""The window statistics' stateful front end: :class:`WindowStats` (constant memory).

Flow: training loop -> ShadowSampler (sgld kernel) -> **WindowStats** -> LLCFilter -> OnlineLLC
records -> callbacks. Feed it one draw ``(d, v)`` per chain per shadow step with
:meth:`WindowStats.update`; every ``W`` draws it closes a window and returns its
:class:`~online_llc.stats.draws.WindowSummary`, the filter's next observation.

What a stream of windows needs beyond the statistics of one (:mod:`online_llc.stats.draws`, re-exported
here) lives in this class: the buffers, the slow-correlation floor over the last ``horizon``
windows, the warm-up and reset flags, the collective that makes every rank of a distributed run
summarise the same draws, and a checkpoint that is validated before it is restored.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from online_llc.errors import check_nonneg_int, check_positive_int
from online_llc.monitor.window_state import dump_state, parse_state
from online_llc.stats.draws import WindowSummary, _plain_int, summarize
from online_llc.stats.mcse import _chain_moments

__all__ = ["WindowStats"]

# The rows of the gathered array, in order: draws, noise variances, flags, heat biases, offset
# norms, discretization biases.
_ROWS = 6


class WindowStats:
    """Collects one draw per chain per call and summarises every ``window`` draws.

    Memory is constant: the current window's five ``[num_chains, window]`` buffers (draws, noise
    variances, flags, heat biases, offset norms) and the draws of the previous ``horizon - 1``
    windows.

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
        gather: for distributed training, a collective ``f(array[6, C, W]) -> array[6, C', W]``
            that concatenates every rank's draws (row 0), noise variances (row 1), flags (row 2,
            see :meth:`update`), heat biases (row 3) and chain offset norms (row 4) along the
            chain axis, identically on every rank. Windows are then summarised over all ranks'
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
        self._b = np.zeros((self.num_chains, self.window), dtype=np.float64)  # heat biases
        self._o = np.full((self.num_chains, self.window), -1.0)  # offset norms (-1: not given)
        self._e = np.full((self.num_chains, self.window), np.nan)  # discretization biases (NaN: none)
        self._count = 0
        self._start_step: int | None = None
        self._last_step: int | None = None

    @property
    def last_step(self) -> int | None:
        """The step of the latest draw added (``None`` before the first, or after :meth:`reset`)."""
        return self._last_step

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

    def smallest(self, value: float) -> float:
        """The smallest ``value`` over the ranks: one ``gather`` of a ``[6, 1, 1]`` array (the
        window's six rows, so a ``gather`` written for windows takes it), which every rank must
        call at the same step; ``value`` itself without a ``gather``."""
        if self.gather is None:
            return value
        return float(np.min(self.gather(np.full((_ROWS, 1, 1), float(value)))))

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
        heat_bias: Sequence[float] | np.ndarray | None = None,
        offset_norms: Sequence[float] | np.ndarray | None = None,
        discretization: Sequence[float] | np.ndarray | None = None,
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
            heat_bias: per chain, the draw's measured minibatch heat bias (finite, ``>= 0``;
                0 for placeholders); the summary's ``heat`` and ``heat_bias`` come from them.
            offset_norms: per chain, the chain's offset norm ``||xi||`` at this draw (finite,
                ``>= 0``); the summary's ``offset_norm`` comes from them (NaN when not given).
            discretization: per chain, the discretization bias measured from the chain's last
                two updates (:class:`online_llc.monitor.shadow.ShadowStep`; any real number, NaN where
                not measured); the summary's ``discretization_bias`` is their mean over the
                measured, non-placeholder draws.

        Returns:
            The window's :class:`WindowSummary` when this call completes a window (the buffer
            is then emptied for the next window), else ``None``.

        Raises:
            ValueError: wrong length or non-finite ``d``/``v``, negative ``v``, or a ``step``
                that is negative, not an int, or before the previous step. The state is left
                unchanged.
            Exception: whatever ``gather`` raised (or a ``ValueError`` for a gathered array of
                the wrong shape). The draw was added and the window's draws dropped: the buffer
                is empty, the next call starts a new window.
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
        # -1 marks a draw that came without a heat measurement (the summary then has none).
        b_row = np.full(self.num_chains, -1.0) if heat_bias is None else self._as_row("heat_bias", heat_bias)
        if heat_bias is not None and np.any(b_row < 0.0):
            raise ValueError(f"Expected `heat_bias` to be >= 0, got {b_row.tolist()!r}.")
        # -1 marks a draw that came without its chain's offset norm (as -1 does for heat biases).
        o_row = np.full(self.num_chains, -1.0) if offset_norms is None else self._as_row("offset_norms", offset_norms)
        if offset_norms is not None and np.any(o_row < 0.0):
            raise ValueError(f"Expected `offset_norms` to be >= 0, got {o_row.tolist()!r}.")
        if discretization is None:
            e_row = np.full(self.num_chains, np.nan)
        else:
            e_row = np.asarray(discretization, dtype=np.float64).reshape(-1)
            if e_row.shape != (self.num_chains,) or np.any(np.isinf(e_row)):
                raise ValueError(
                    f"Expected `discretization` to be {self.num_chains} finite values or NaN, got {discretization!r}."
                )
        self._d[:, self._count] = d_row
        self._v[:, self._count] = v_row
        self._f[:, self._count] = f_row
        self._b[:, self._count] = b_row
        self._o[:, self._count] = o_row
        self._e[:, self._count] = e_row
        if self._count == 0:
            self._start_step = step
        self._count += 1
        self._last_step = step
        if self._count < self.window:
            return None

        assert self._start_step is not None
        d_all, v_all, f_all, b_all, o_all, e_all = self._d, self._v, self._f, self._b, self._o, self._e
        if self.gather is not None:
            # One collective for all six arrays: every rank gets every rank's chains, in rank order.
            try:
                packed = np.asarray(
                    self.gather(np.stack([self._d, self._v, self._f, self._b, self._o, self._e])), dtype=np.float64
                )
                if packed.ndim != 3 or packed.shape[0] != _ROWS or packed.shape[2] != self.window:
                    raise ValueError(
                        f"Expected `gather` to return an array of shape [{_ROWS}, chains, {self.window}], got {packed.shape}."
                    )
            except BaseException:
                # The window cannot be summarised: its draws are dropped (the draw of this call
                # counts as added, `last_step` is this step) so that the buffer is never left full
                # and the next draw starts a new window; the caller sees the exception.
                self.drop_pending()
                raise
            d_all, v_all, f_all, b_all, o_all, e_all = packed
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
            d_all, v_all, f_all, b_all, o_all, e_all = (a[:, -keep:] for a in (d_all, v_all, f_all, b_all, o_all, e_all))
        summary = summarize(
            d_all, v_all, start_step=self._start_step, end_step=step, var_of_mean_floor=self._floor(d_all),
            heat_biases=b_all if np.all(b_all >= 0.0) else None,
        )
        summary = replace(
            summary,
            diverged_draws=int(np.sum(f_all == 1)),
            warmup_draws=int(np.sum(f_all == 2)),
            dropped_draws=dropped,
            offset_norm=_mean_offset_norm(o_all, f_all),
            discretization_bias=_mean_discretization(e_all, f_all),
        )
        if self.horizon > 1:
            self._past = (self._past + [d_all.copy()])[-(self.horizon - 1) :]
        self._count = 0
        self._start_step = None
        return summary

    def state_dict(self) -> dict[str, Any]:
        """The state as plain Python ints, floats, lists and ``None`` (safe for
        ``torch.load(weights_only=True)``); only the pending draws are stored
        (:func:`~online_llc.monitor.window_state.dump_state`)."""
        pending = {key: buf[:, : self._count] for key, buf in self._buffers().items()}
        return dump_state(
            window=self.window, num_chains=self.num_chains, horizon=self.horizon, pending=pending,
            past=self._past, start_step=self._start_step, last_step=self._last_step,
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly; validated fully before anything changes
        (:func:`~online_llc.monitor.window_state.parse_state`).

        Raises:
            KeyError: if keys are missing or unexpected.
            ValueError: if ``window`` or ``num_chains`` differ from this object's, or the
                pending draws are inconsistent with ``count``.
        """
        parsed = parse_state(state, window=self.window, num_chains=self.num_chains, horizon=self.horizon)
        count = parsed.count
        self._past = parsed.past
        for key, buf in self._buffers().items():
            buf[:, :count] = parsed.pending[key]
        self._count = count
        self._start_step = parsed.start_step
        self._last_step = parsed.last_step

    def _buffers(self) -> dict[str, np.ndarray]:
        """The current window's buffers by their state key (:data:`~online_llc.monitor.window_state.ROW_KEYS`)."""
        return {"d": self._d, "v": self._v, "f": self._f, "b": self._b, "o": self._o, "e": self._e}


def _mean_offset_norm(norms: np.ndarray, flags: np.ndarray) -> float:
    """The mean offset norm of a window's draws, reset placeholders and missing norms (-1) left
    out (``math.nan`` when none is left)."""
    given = (flags != 1) & (norms >= 0.0)
    return float(norms[given].mean()) if given.any() else math.nan


def _mean_discretization(biases: np.ndarray, flags: np.ndarray) -> float:
    """The mean measured discretization bias of a window's draws, reset placeholders and
    unmeasured draws (NaN) left out (``math.nan`` when none is left)."""
    given = (flags != 1) & np.isfinite(biases)
    return float(biases[given].mean()) if given.any() else math.nan
