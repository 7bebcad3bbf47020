"""State-space filter for the LLC trajectory: a local linear trend over training-step time.

Flow: training loop -> ShadowSampler (sgld kernel) -> WindowStats -> **LLCFilter** -> OnlineLLC
records -> callbacks. Each window summary (its mean and standard error) is one observation; the
filtered level and its variance become the estimate and band of :class:`~online_llc.OnlineLLC`.

The hidden state is ``x = [level, slope]`` (LLC and its change per training step). Window means
arrive at irregular training steps ``t_k`` with their own variance ``R_k = se_k^2``. Between two
observations ``dt = t_k - t_{k-1}`` apart the state evolves as (continuous white-noise
acceleration, Bar-Shalom et al. 2001, section 6.2)::

    x_k = F x_{k-1} + w,   F = [[1, dt], [0, 1]],
    w ~ N(0, Q),           Q = q [[dt^3 / 3, dt^2 / 2], [dt^2 / 2, dt]],
    z_k = H x_k + v,       H = [1, 0],   v ~ N(0, R_k).

so the band widens between observations and shrinks at each. ``q`` is scale-aware: with
``tau`` the typical gap (a running mean of ``dt``) and ``scale`` the typical observation standard
deviation (a running mean of ``sqrt(R)``), ``q = (process_noise * scale)^2 / tau^3``, so over one
typical gap the level diffuses by ``sqrt(Q[0, 0]) = sqrt(q tau^3 / 3) = process_noise * scale /
sqrt(3)``. The same settings then work for an LLC of 0.1 or 1e5, positive or negative.

Jumps: developmental transitions move the LLC by orders of magnitude within a window or two, far
faster than any ``q`` that keeps plateaus smooth. The filter declares a jump when the normalized
innovation squared ``nis = y^2 / S`` of an observation exceeds ``jump_threshold``, or when two
consecutive observations both exceed ``confirm_threshold`` on the same side (a level shift that
arrived spread over two windows, each looking only moderately surprising). It then inflates the
prior variance of the level by the size of the surprise (``P += diag(y^2, 0)``) before updating,
so the estimate moves to the new level in that window instead of lagging by many; the slope is
left alone (a ramp shows as a run of jumps).

Noise scale: the stated ``R`` is a standard-error estimate from 40 correlated draws, biased
(Geyer's initial-sequence estimator over-states a short window's variance by about 30% on the toy
models) and blind to slow wandering of the chain. The filter rescales it by an
innovation-matched factor ``c`` (covariance matching, Mehra 1972): after each ordinary update
``c <- (1 - a) c + a c min(nis, 9)``, clipped to [0.25, 4], with ``nis`` computed against
``c R``, so that the mean ``nis`` is 1 when the innovations are Gaussian. ``a`` is
``noise_adaptation`` (0 switches it off); jumps and the update after one (whose prior is
inflated) do not teach ``c``; the winsorizing at 9 keeps a single outlier from doubling it.

The predict/update arithmetic is filterpy's ``KalmanFilter`` (per-call ``F``, ``Q``, ``R``); this
module adds the irregular time grid, the scale-aware ``Q``, the jump rule, the noise scale and a
checkpointable state, which filterpy does not have.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Mapping, Tuple

import numpy as np
from filterpy.kalman import KalmanFilter

from online_llc.errors import check_positive_float, check_positive_int

__all__ = ["FilterInfo", "LLCFilter", "transition_matrices"]

_H = np.array([[1.0, 0.0]])
# Weight of a new gap / observation scale in the running means that set q.
_EMA = 0.2


def transition_matrices(dt: float, q: float) -> Tuple[np.ndarray, np.ndarray]:
    """``F`` and ``Q`` of the local linear trend over a gap of ``dt`` training steps."""
    F = np.array([[1.0, dt], [0.0, 1.0]])
    Q = q * np.array([[dt**3 / 3.0, dt**2 / 2.0], [dt**2 / 2.0, dt]])
    return F, Q


@dataclass(frozen=True)
class FilterInfo:
    """What one filter update saw.

    Attributes:
        innovation: ``y = z - H x_prior``.
        innovation_var: ``S = H P_prior H^T + R``.
        gain: the Kalman gain ``K`` (level, slope).
        nis: normalized innovation squared ``y^2 / (H P_prior H^T + c r_test)`` with the noise
            scale ``c`` (chi-square with 1 dof when the model fits; equal to ``y^2 / S`` unless a
            separate ``r_test`` is given). The jump test uses ``max(c, 1)`` in place of ``c``.
        jump: whether the update was treated as a jump.
    """

    innovation: float
    innovation_var: float
    gain: Tuple[float, float]
    nis: float
    jump: bool


class LLCFilter:
    """Local linear trend filter over irregular, sparse observations (see module docstring).

    Args:
        process_noise: sets the level's diffusion over a typical gap, ``process_noise / sqrt(3)``
            typical observation stds (> 0). Smaller: smoother on plateaus, slower on ramps.
        jump_threshold: ``nis`` above which an observation is treated as a jump (> 0; the default
            16 is a 4-sigma surprise).
        confirm_threshold: ``nis`` that two consecutive same-sign innovations must both exceed to
            be treated as a jump (> 0; the default 4 is two 2-sigma surprises in a row, which
            happens by chance about once in 1000 windows).
        max_history: updates kept for :meth:`smooth` (oldest dropped first): memory is bounded
            by about 13 floats per kept update.
        noise_adaptation: weight ``a`` in [0, 1) of the innovation-matched noise scale's running
            mean (see the module docstring; 0: use the stated ``R`` as it is).
    """

    def __init__(
        self,
        *,
        process_noise: float = 0.1,
        jump_threshold: float = 16.0,
        confirm_threshold: float = 4.0,
        max_history: int = 100_000,
        noise_adaptation: float = 0.05,
    ) -> None:
        self.max_history = check_positive_int("max_history", max_history)
        if isinstance(noise_adaptation, bool) or not isinstance(noise_adaptation, (int, float)) or not (
            0 <= noise_adaptation < 1
        ):
            raise ValueError(f"Expected `noise_adaptation` to be a float in [0, 1), got {noise_adaptation!r}.")
        self.noise_adaptation = float(noise_adaptation)
        self.process_noise = check_positive_float("process_noise", process_noise)
        self.jump_threshold = check_positive_float("jump_threshold", jump_threshold)
        self.confirm_threshold = check_positive_float("confirm_threshold", confirm_threshold)
        self._kf = KalmanFilter(dim_x=2, dim_z=1)
        self.reset()

    # ---- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (the next observation initializes the level)."""
        self._kf.x = np.zeros((2, 1))
        self._kf.P = np.eye(2)
        self.last_step: int | None = None
        self.num_updates = 0
        self._tau = 0.0  # running mean gap between observations (training steps)
        self._scale = 0.0  # running mean observation std
        self._last_nis = 0.0  # previous update's nis, signed by its innovation
        self._c = 1.0
        self._after_jump = False
        # Per update, for the smoother: (step, dt, z, r, x_post[2], P_post[4], Q_used[4]) where
        # Q_used is the process noise actually added, jump inflation included.
        self._history: Deque[List[float]] = deque(maxlen=self.max_history)

    @property
    def initialized(self) -> bool:
        """Whether at least one observation has been absorbed."""
        return self.last_step is not None

    @property
    def q(self) -> float:
        """Current spectral density of the slope's white noise."""
        return self._q(self._tau)

    def _q(self, tau: float) -> float:
        if tau <= 0 or self._scale <= 0:
            return 0.0
        return (self.process_noise * self._scale) ** 2 / tau**3

    def _tau_after(self, dt: float) -> float:
        """The running mean gap once a gap of ``dt`` has been folded in (an update does that
        before it predicts, so predict() uses the same value and reports the same prior)."""
        if dt <= 0:
            return self._tau
        return dt if self._tau == 0 else (1 - _EMA) * self._tau + _EMA * dt

    def _prior(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        assert self.last_step is not None
        dt = float(step - self.last_step)
        if dt <= 0:
            return self._kf.x.copy(), self._kf.P.copy()
        F, Q = transition_matrices(dt, self._q(self._tau_after(dt)))
        return F @ self._kf.x, F @ self._kf.P @ F.T + Q

    def predict(self, step: int) -> Tuple[float, float]:
        """Prior mean and std of the level at ``step`` without changing the filter."""
        if self.last_step is None:
            raise RuntimeError("LLCFilter.predict() called before the first observation.")
        x, P = self._prior(step)
        return float(x[0, 0]), math.sqrt(max(P[0, 0], 0.0))

    @property
    def mean(self) -> float:
        """Posterior level at the last observation."""
        return float(self._kf.x[0, 0])

    @property
    def std(self) -> float:
        """Posterior std of the level at the last observation."""
        return math.sqrt(max(float(self._kf.P[0, 0]), 0.0))

    @property
    def slope(self) -> float:
        """Posterior slope (LLC per training step)."""
        return float(self._kf.x[1, 0])

    @property
    def slope_std(self) -> float:
        """Posterior std of the slope at the last observation."""
        return math.sqrt(max(float(self._kf.P[1, 1]), 0.0))

    # ---- update ---------------------------------------------------------------------------------
    def update(
        self, z: float, r: float, step: int, r_test: float | None = None, *, force_jump: bool = False
    ) -> Tuple[float, float, FilterInfo]:
        """Absorb a window mean ``z`` with variance ``r`` observed at training step ``step``.

        Args:
            z: the observation (finite; a non-finite value would poison the state, so it is
                rejected here).
            r: its variance ``se^2`` (finite, > 0).
            step: training step of the observation (not before the previous one).
            r_test: the variance used for the jump test (default ``r``). The online estimator
                passes the window's own ``se^2`` here and a long-horizon ``se^2`` (which also
                counts the chain's slow wandering) as ``r``: a level shift must stand out against
                the window's own noise to be a jump, while the band must cover slow wandering.
            force_jump: treat this observation as a jump whatever its ``nis`` (the caller knows
                the level may have moved: the training weights jumped since the last one).

        Returns:
            ``(mean, std, info)`` of the level after the update.
        """
        if not math.isfinite(z):
            raise ValueError(f"Expected `z` to be finite, got {z!r}: a diverged window must not reach the filter.")
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"Expected `r` to be a finite float > 0, got {r!r}.")
        if r_test is None:
            r_test = r
        elif not (math.isfinite(r_test) and r_test > 0):
            raise ValueError(f"Expected `r_test` to be a finite float > 0, got {r_test!r}.")
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"Expected `step` to be >= the previous observation's step {self.last_step}, got {step}.")
        kf = self._kf
        sd = math.sqrt(r)
        if self.last_step is None:
            # First observation: level = z; slope unknown but bounded by the observation scale.
            kf.x = np.array([[z], [0.0]])
            kf.P = np.diag([r, r / max(step, 1) ** 2])
            self.last_step, self._scale, self.num_updates = int(step), sd, 1
            self._record(step, 0.0, z, r, np.zeros((2, 2)))
            info = FilterInfo(0.0, r, (1.0, 0.0), 0.0, False)
            return self.mean, self.std, info

        dt = float(step - self.last_step)
        P_prev = self._kf.P.copy()
        x_prior, P_prior = self._prior(step)
        self._tau = self._tau_after(dt)
        y = z - float(x_prior[0, 0])
        c = self._c
        pp = float(P_prior[0, 0])
        # The jump test never trusts the noise below the stated standard error (it may widen it):
        # a scale under 1 calibrates nis on average, but the draws' tails are heavier than
        # Gaussian, and shrinking the test's variance made false two-window jumps several times
        # likelier on stationary chains.
        nis_test = y * y / (pp + max(c, 1.0) * r_test)
        r, r_test = c * r, c * r_test
        S = pp + r
        nis = y * y / (pp + r_test)
        signed = math.copysign(nis_test, y)
        jump = force_jump or nis_test > self.jump_threshold or (
            nis_test > self.confirm_threshold
            and abs(self._last_nis) > self.confirm_threshold
            and signed * self._last_nis > 0
        )
        if not jump and not self._after_jump and self.noise_adaptation > 0:
            a = self.noise_adaptation
            self._c = float(min(max((1 - a) * c + a * c * min(nis, 9.0), 0.25), 4.0))
        self._after_jump = bool(jump)
        # After a jump the next window starts a fresh comparison.
        self._last_nis = 0.0 if jump else signed
        if jump:
            # Only the level is freed: a step, not a ramp. Freeing the slope too (by (y / tau)^2)
            # read the step as a steep trend; the next windows then overshot, and the smoothed
            # curve smeared each jump into the following plateau (measured on the stagewise run:
            # relative RMSE against a gold curve 0.29 -> 0.16 smoothed, 0.58 -> 0.48 live).
            P_prior = P_prior + np.diag([y * y, 0.0])
        kf.x, kf.P = x_prior, P_prior
        kf.update(np.array([[z]]), R=np.array([[r]]), H=_H)
        F, _ = transition_matrices(max(dt, 0.0), 0.0)
        self._record(step, max(dt, 0.0), z, r, P_prior - F @ P_prev @ F.T)
        self._scale = (1 - _EMA) * self._scale + _EMA * sd
        self.last_step = int(step)
        self.num_updates += 1
        gain = (float(kf.K[0, 0]), float(kf.K[1, 0]))
        return self.mean, self.std, FilterInfo(y, S, gain, nis, jump)

    def _record(self, step: int, dt: float, z: float, r: float, q_used: np.ndarray) -> None:
        x, P = self._kf.x.ravel(), self._kf.P.ravel()
        self._history.append(
            [float(step), float(dt), float(z), float(r), *map(float, x), *map(float, P), *map(float, q_used.ravel())]
        )

    def smooth(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rauch-Tung-Striebel smoothed trajectory over the kept updates (Rauch et al. 1965)::

            C_k  = P_k F_{k+1}^T (F_{k+1} P_k F_{k+1}^T + Q_{k+1})^-1
            x^s_k = x_k + C_k (x^s_{k+1} - F_{k+1} x_k),  P^s_k = P_k + C_k (P^s_{k+1} - P^-_{k+1}) C_k^T

        with the ``F`` and ``Q`` each update actually used (a jump's inflation is part of its Q),
        computed by filterpy's ``rts_smoother``.

        Returns:
            ``(steps, level, level_std, slope)`` arrays, one entry per kept update.
        """
        if not self._history:
            empty = np.zeros(0)
            return empty, empty, empty, empty
        h = np.array(self._history)
        xs = h[:, 4:6].reshape(-1, 2, 1)
        ps = h[:, 6:10].reshape(-1, 2, 2)
        qs = h[:, 10:14].reshape(-1, 2, 2)
        fs = np.array([transition_matrices(dt, 0.0)[0] for dt in h[:, 1]])
        x_s, p_s, _, _ = self._kf.rts_smoother(xs, ps, Fs=list(fs), Qs=list(qs))
        std = np.sqrt(np.maximum(p_s[:, 0, 0], 0.0))
        return h[:, 0].astype(int), x_s[:, 0, 0], std, x_s[:, 1, 0]

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values only (torch loads checkpoints with ``weights_only=True``)."""
        return {
            "x": [float(v) for v in self._kf.x.ravel()],
            "P": [[float(v) for v in row] for row in self._kf.P],
            "last_step": self.last_step,
            "num_updates": self.num_updates,
            "tau": self._tau,
            "scale": self._scale,
            "process_noise": self.process_noise,
            "jump_threshold": self.jump_threshold,
            "confirm_threshold": self.confirm_threshold,
            "noise_adaptation": self.noise_adaptation,
            "last_nis": self._last_nis,
            "noise_scale": self._c,
            "after_jump": self._after_jump,
            "history": [list(row) for row in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; settings must match."""
        for key in ("process_noise", "jump_threshold", "confirm_threshold", "noise_adaptation"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(f"Expected `{key}` = {getattr(self, key)} in the state, got {state[key]!r}.")
        self._kf.x = np.array(state["x"], dtype=float).reshape(2, 1)
        self._kf.P = np.array(state["P"], dtype=float).reshape(2, 2)
        self.last_step = None if state["last_step"] is None else int(state["last_step"])
        self.num_updates = int(state["num_updates"])
        self._tau = float(state["tau"])
        self._scale = float(state["scale"])
        self._last_nis = float(state["last_nis"])
        self._c = float(state["noise_scale"])
        self._after_jump = bool(state["after_jump"])
        self._history = deque((list(map(float, row)) for row in state.get("history", [])), maxlen=self.max_history)
