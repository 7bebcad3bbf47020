"""One tracked quantity's state machine: from each shadow step's draws to a window's status.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. A :class:`Track` owns one quantity (the whole model's LLC, or one parameter group's
weight-refined LLC): its chains, window statistics, filter and history, and the policy that
joins them. At every shadow step it flags each chain's draw (healthy, warming up, or a reset
chain's placeholder), restarts the warm-up when the training weights jump; when a window closes
it decides the window's status, feeds the filter or not, and records an :class:`LLCEstimate`.
:class:`online_llc.OnlineLLC` owns the tracks and schedules their shadow steps.

Statuses (``LLCEstimate.status``):

* ``warming_up``: the window holds draws from a chain that has not yet equilibrated: at the
  start, after a chain reset, or after the training weights jumped (see
  :mod:`online_llc.monitor.warmup`; with ``warmup="auto"`` equilibrium is detected from the draws and the
  offset norm, otherwise it is a fixed count of shadow steps). The record shows the raw window
  mean; the filter is not fed.
* ``diverged``: a chain produced a non-finite draw or ran away during this window; it was reset
  (``divergences``), its draw replaced by a flagged placeholder, the window not fed to the filter.
* ``transition``: the window was a jump (a many-sigma surprise, or the first window after a jump
  of the training weights) or followed one: the LLC is moving fast.
* ``not_at_minimum``: the band lies entirely below zero: the sampler finds lower loss nearby, as
  at saddles and plateaus; the LLC is not defined there in the usual sense.
* ``tracking``: otherwise.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from online_llc.calibration.step import max_step_size, relaxation_steps
from online_llc.config import SGLDConfig
from online_llc.kernel.evaluator import LossEvaluator
from online_llc.monitor.cadence import DEFAULT_HORIZON, Cadence
from online_llc.monitor.policy import MEASURE_EVERY, NO_BATCH, cooled_step, lag_std, measuring, sized_config, transitions, window_status
from online_llc.monitor.settings import MonitorSettings
from online_llc.monitor.shadow import ShadowSampler
from online_llc.monitor.warmup import EquilibrationDetector, WeightJumpDetector
from online_llc.monitor.window import WindowStats
from online_llc.records import LLCEstimate, SmoothedPoint, Transition
from online_llc.stats.draws import WindowSummary
from online_llc.stats.filter import LLCFilter

__all__ = ["MAX_AUTO_WARMUP", "MIN_AUTO_WARMUP", "MIN_REWARMUP", "Track"]

#: The longest data-driven warm-up, in shadow steps: a chain that never looks settled (one that
#: keeps following fast training, say) is used after this many draws anyway.
MAX_AUTO_WARMUP = 400
#: The shortest data-driven warm-up of a chain that starts at zero offset (start, reset).
MIN_AUTO_WARMUP = 100
#: The shortest one after a jump of the weights (the chains keep their offsets).
MIN_REWARMUP = 60
# Shadow steps of centre movement seen before a weight jump can be declared.
_MIN_SHIFT_HISTORY = 10


class Track:
    """One estimated quantity (the whole model's LLC, or one group's weight-refined LLC): its
    chains, window statistics, filter and history. Owned by :class:`online_llc.OnlineLLC`.

    Args:
        sampler: the quantity's chains.
        stats: its window statistics.
        filt: its filter.
        warmup: ``"auto"`` (data-driven warm-up) or a fixed number of shadow steps.
        z: the band's half-width in standard deviations.
        calibrate: size the step to the batch at the first shadow step, then lower it after a
            window whose measured minibatch heat is gross (:mod:`online_llc.calibration.heat`); the estimand
            (``nbeta``, ``localization``) never changes.
        min_warmup, max_warmup, min_rewarmup, warmup_tail: the data-driven warm-up's bounds
            (shadow steps from a zero offset, at most, after a weight jump) and the stationary
            tail its test needs; :func:`online_llc.monitor.cadence.auto_cadence` shortens them for short runs.
        measure_every: once a regime's heat is known, one window in this many measures it
            (:func:`online_llc.monitor.policy.measuring`); the others run plain shadow steps.
        gradient: the chains' gradient, decided with the step at the first shadow step
            (:func:`online_llc.monitor.policy.sized_config`) when ``calibrate``.
    """

    def __init__(
        self,
        sampler: ShadowSampler,
        stats: WindowStats,
        filt: LLCFilter,
        *,
        warmup: Union[int, str],
        z: float,
        calibrate: bool = False,
        min_warmup: int = MIN_AUTO_WARMUP,
        max_warmup: int = MAX_AUTO_WARMUP,
        min_rewarmup: int = MIN_REWARMUP,
        warmup_tail: int = 30,
        measure_every: int = MEASURE_EVERY,
        gradient: str = "auto",
    ) -> None:
        self.sampler, self.stats, self.filter = sampler, stats, filt
        # The chains the band pools (every rank's, from the gathered windows): sets how far a hot
        # step is cooled (cooling_excess).
        self._band_chains = sampler.num_chains
        self.min_warmup, self.max_warmup = min_warmup, max_warmup
        self.min_rewarmup, self.warmup_tail = min_rewarmup, warmup_tail
        self.warmup, self._z = warmup, z
        self.calibrate = calibrate
        self.measure_every, self.gradient = measure_every, gradient
        cfg = sampler.config
        self.max_step = max_step_size(cfg.nbeta, cfg.sampler, cfg.friction, cfg.step_size, online=True)
        self.auto_warmup = warmup == "auto"
        self.num_chains = sampler.num_chains
        self._init()

    @classmethod
    def build(
        cls,
        evaluator: LossEvaluator,
        config: SGLDConfig,
        settings: MonitorSettings,
        cadence: Cadence,
        *,
        seed: int,
        z: float,
        masks: Optional[Dict[str, Any]] = None,
        gather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ) -> "Track":
        """A track with the monitor's options: ``settings`` (its chains and filter), ``cadence``
        (its windows and warm-up bounds), its own ``seed``, and ``masks`` for a group's chains."""
        sampler = ShadowSampler(
            evaluator, config, num_chains=settings.num_chains, seed=seed, max_offset_norm=settings.max_offset_norm, masks=masks,
            measure_discretization=settings.measure_discretization,
        )
        return cls(
            sampler,
            WindowStats(cadence.window, settings.num_chains, horizon=DEFAULT_HORIZON, gather=gather),
            LLCFilter(process_noise=settings.process_noise, jump_threshold=settings.jump_threshold),
            warmup=settings.warmup_policy,
            z=z,
            calibrate=settings.step_size is None,
            min_warmup=cadence.min_warmup,
            max_warmup=cadence.max_warmup,
            min_rewarmup=cadence.min_rewarmup,
            warmup_tail=cadence.warmup_tail,
            measure_every=settings.measure_every,
            gradient=settings.gradient,
        )

    def _init(self) -> None:
        self.warmup_left = [0 if self.auto_warmup else self.warmup] * self.num_chains
        self.detectors = [
            EquilibrationDetector(min_draws=self.min_warmup, max_draws=self.max_warmup, tail=self.warmup_tail)
            for _ in range(self.num_chains)
        ]
        self.jumps = WeightJumpDetector(min_history=_MIN_SHIFT_HISTORY)
        self.last_jump = False
        # Set by a jump of the weights: the filter's level is stale, the next fed window resets it.
        self.level_stale = False
        self.weight_jumps = 0
        self.warmup_lengths: List[int] = []
        self.history: List[LLCEstimate] = []
        self.sized = not self.calibrate  # whether the step was sized to the batch (first shadow step)
        # History index from which the heat is pooled (the step last changed there).
        self.step_changed_at = 0
        # Whether the open window measures the heat (decided as it opens: policy.measuring).
        self.measuring = True

    # ---- warm-up policy ---------------------------------------------------------------------------
    def _restart_warmup(self, c: int, from_zero: bool = True) -> None:
        if self.auto_warmup:
            # A chain restarted at zero offset may sit at a saddle, where it leaves along the
            # unstable directions slowly at first, exponentially later: no test on its first
            # draws can tell that from stationarity (the stagewise demo's chain looked settled
            # after 60 draws and fell from -6 to -2800 over the next 150), so the floor is
            # MIN_AUTO_WARMUP (shorter only for runs too short for it, online_llc.monitor.cadence). A
            # chain whose offsets were kept through a weight jump is already spread out and only
            # needs MSER's own minimum.
            self.detectors[c].restart(None if from_zero else self.min_rewarmup)
        else:
            self.warmup_left[c] = self.warmup

    def restart_warmups(self, from_zero: bool = False) -> None:
        """Put every chain back into warm-up (after a jump of the weights, or on a rank whose
        chains were copied from another's): its draws are flagged until it has re-equilibrated.
        ``from_zero``: the chains restart at zero offset (else they keep their offsets)."""
        for c in range(self.num_chains):
            self._restart_warmup(c, from_zero)

    def _warming(self, c: int, draw: float, offset_norm: float) -> bool:
        """Whether this draw of chain ``c`` is a warm-up draw (and advance its warm-up)."""
        if self.auto_warmup:
            det = self.detectors[c]
            was = det.equilibrated
            warming = det.add(draw, offset_norm**2)
            if det.equilibrated and not was and det.warmup_length is not None:
                self.warmup_lengths.append(det.warmup_length)
            return warming
        warming = self.warmup_left[c] > 0
        self.warmup_left[c] = max(self.warmup_left[c] - 1, 0)
        return warming

    def reset(self) -> None:
        """Start over: chains at zero offset, empty windows, a fresh filter, an empty history."""
        for c in range(self.num_chains):
            self.sampler.reset_chain(c)
        self.sampler.divergences = 0
        self.sampler.anchor.reset()
        self.stats.reset()
        self.filter.reset()
        self._init()

    # ---- one shadow step ----------------------------------------------------------------------------
    def shadow_step(self, batch: Any, step: int, shadow_steps: int) -> Optional[LLCEstimate]:
        """Run the chains on ``batch`` at training step ``step``; the estimate when a window closed."""
        self._open_window()
        out = self.sampler.step(batch, measure=self.measuring)
        if not self.sized:
            # The batch size is known now (the ranks' smallest): the gradient and the starting step.
            b, sharded = int(self.stats.smallest(out.infos[0].batch_size)), self.sampler.evaluator.sharded
            self.sampler.config = sized_config(self.sampler.config, b, self.gradient, sharded)
            self.sized = True
        # Decided from the weights' movement and the last gathered window: the same on every rank.
        if self.jumps.add(out.center_shift):
            # The chains' offsets were drawn for the old weights: re-equilibrate all of them.
            self.weight_jumps += 1
            self.level_stale = True
            self.restart_warmups(from_zero=False)
            self.sampler.anchor.reset()  # the centre's gradient changed with it
        # Every chain adds a draw at every shadow step, so windows close (and, under DDP, their
        # collective runs) at the same step on every rank. A reset chain adds a flagged
        # placeholder (its draw is meaningless and may be non-finite); a warming chain a flagged draw.
        d, v, b, o, e, flags = [], [], [], [], [], []
        measured = out.discretization or [math.nan] * len(out.infos)
        for c, (info, bad) in enumerate(zip(out.infos, out.diverged)):
            if bad:
                d.append(0.0)
                v.append(0.0)
                b.append(0.0)
                o.append(0.0)
                e.append(math.nan)
                flags.append(1)
                self._restart_warmup(c)
            else:
                d.append(info.draw)
                v.append(info.noise_var)
                b.append(info.heat_bias)
                o.append(info.offset_norm)
                e.append(measured[c])
                flags.append(2 if self._warming(c, info.draw, info.offset_norm) else 0)
        b, e = (b, e) if self.measuring else (None, None)
        summary = self.stats.update(d, v, step, flags=flags, heat_bias=b, offset_norms=o, discretization=e)
        return None if summary is None else self._close_window(summary, shadow_steps)

    def _open_window(self) -> None:  # at a window's first draw, decide whether it measures the heat
        if self.stats.num_pending == 0:
            self.measuring = measuring(self.history, self.step_changed_at, self.measure_every)

    def skip(self, step: int, shadow_steps: int) -> Optional[LLCEstimate]:
        """Add flagged placeholder draws instead of running the chains (see ``OnlineLLC.skip_step``)."""
        n = self.num_chains
        if not self.sized:  # join the collective in which the ranks agree on the batch size
            self.sized = self.stats.smallest(NO_BATCH) > 0
        self._open_window()
        summary = self.stats.update([0.0] * n, [0.0] * n, step, flags=[1] * n)
        return None if summary is None else self._close_window(summary, shadow_steps)

    def lag(self, first: int, last: int, step_size: Optional[float] = None) -> float:
        """How far the chains may trail the level (``policy.lag_std``) at ``step_size`` (default:
        the current step); a window's steps ``first``..``last`` give the stride."""
        stride = (last - first) / max(self.stats.window - 1, 1)
        cfg = self.sampler.config if step_size is None else replace(self.sampler.config, step_size=step_size)
        return lag_std(self.filter.slope, relaxation_steps(cfg), stride)

    def band_at(self, step: int) -> Tuple[float, float]:
        """The predicted mean and std at training step ``step``, widened by the last reading's lag
        at the step it was drawn with (NaN and inf before the filter's first window)."""
        if not self.filter.initialized:
            return math.nan, math.inf
        mean, std = self.filter.predict(step)
        last = self.history[-1]  # a fed window exists once the filter is initialized
        return mean, math.hypot(std, self.lag(last.window_start, last.step, last.step_size))

    # ---- status policy ------------------------------------------------------------------------------
    def _close_window(self, s: WindowSummary, shadow_steps: int) -> LLCEstimate:
        # The chains' spread for the weight-jump test until the next close (gathered: every rank's).
        self.jumps.set_spread(s.offset_norm)
        self._band_chains = max(1, s.n_draws // self.stats.window)
        nis = math.nan
        if s.diverged_draws or s.warmup_draws:
            # Decided from the (gathered) flags: the same verdict on every rank.
            status = window_status(bool(s.diverged_draws), bool(s.warmup_draws), False, False, math.nan)
            mean, std, slope = s.mean, s.se, math.nan
            # Unequilibrated draws must not inform later windows' autocorrelation estimates.
            self.stats.clear_history()
        else:
            r = max(s.se**2, 1e-300)
            r_test = max(s.se_window**2, 1e-300)
            mean, std, info = self.filter.update(s.mean, r, s.end_step, r_test=r_test, force_jump=self.level_stale)
            self.level_stale = False
            slope, nis = self.filter.slope, info.nis
            # A co-moving chain trails a moving centre: the band widens with the level's slope.
            std = math.hypot(std, self.lag(s.start_step, s.end_step))
            status = window_status(False, False, info.jump, self.last_jump, mean + self._z * std)
            self.last_jump = info.jump
            if info.jump:
                # The past windows describe the old level: they would read the jump as correlation.
                self.stats.clear_history()
        est = LLCEstimate(
            step=s.end_step,
            mean=mean,
            std=std,
            lower=mean - self._z * std,
            upper=mean + self._z * std,
            status=status,
            raw_mean=s.mean,
            raw_se=s.se,
            slope=slope,
            var_channel=s.var_channel,
            ratio=s.ratio,
            dispersion=s.dispersion,
            ess=s.ess,
            nis=nis,
            window_start=s.start_step,
            shadow_steps=shadow_steps,
            divergences=self.sampler.divergences,
            # NaN for a window of plain steps: nothing was measured.
            heat=s.heat if self.measuring else math.nan,
            heat_bias=s.heat_bias if self.measuring else math.nan,
            step_size=self.sampler.config.step_size,
            discretization_bias=s.discretization_bias,
        )
        self.history.append(est)
        if self.calibrate and status == "tracking":
            self._cool_if_gross(len(self.history))
        return est

    def _cool_if_gross(self, upto: int) -> None:
        """Apply :func:`~online_llc.monitor.policy.cooled_step` to the windows since the step last
        changed (a window whose heat bias takes its whole positive estimate reads heat ``inf``)."""
        cfg = self.sampler.config
        new = cooled_step(self.history[self.step_changed_at : upto], self._band_chains, cfg.step_size, self.max_step)
        if new is not None:
            self.sampler.config = replace(cfg, step_size=new)
            self.step_changed_at = upto

    # ---- retrospective ------------------------------------------------------------------------------
    def smoothed(self) -> List[SmoothedPoint]:
        """The RTS-smoothed curve over every window the filter absorbed."""
        steps, mean, std, slope = self.filter.smooth()
        z = self._z
        return [
            SmoothedPoint(int(t), float(m), float(s), float(m - z * s), float(m + z * s), float(b))
            for t, m, s, b in zip(steps, mean, std, slope)
        ]

    def transitions(self) -> List[Transition]:
        """Runs of ``transition`` windows, with the smoothed level before and after each."""
        return transitions(self.history, {p.step: p.mean for p in self.smoothed()})

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self, shards: bool = False) -> Dict[str, Any]:
        """Chains (tensors; this rank's own shards with ``shards``), windows, filter, warm-up, history."""
        jumps = self.jumps.state_dict()
        return {
            "warmup_left": list(self.warmup_left),
            "detectors": [det.state_dict() for det in self.detectors],
            "weight_jumps": self.weight_jumps,
            "level_stale": self.level_stale,
            "warmup_lengths": list(self.warmup_lengths),
            # The jump detector's state, in the checkpoint's original layout (plus its version).
            "shift": [jumps["shift_mean"], jumps["offset_mean"], jumps["count"], jumps["version"]],
            "last_jump": self.last_jump,
            "sized": self.sized,
            "step_changed_at": self.step_changed_at,
            "measuring": self.measuring,
            "sampler": self.sampler.state_dict(shards),
            "window_stats": self.stats.state_dict(),
            "filter": self.filter.state_dict(),
            "history": [e.to_dict() for e in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.sampler.load_state_dict(state["sampler"])
        self.stats.load_state_dict(state["window_stats"])
        self.filter.load_state_dict(state["filter"])
        self.warmup_left = [int(w) for w in state["warmup_left"]]
        for det, st in zip(self.detectors, state["detectors"]):
            det.load_state_dict(st)
        self.weight_jumps = int(state["weight_jumps"])
        self.level_stale = bool(state["level_stale"])
        self.warmup_lengths = [int(k) for k in state["warmup_lengths"]]
        shift = state["shift"]
        self.jumps.load_state_dict(
            {"shift_mean": shift[0], "offset_mean": shift[1], "count": shift[2], "version": shift[3]}
        )
        self.last_jump = bool(state["last_jump"])
        self.sized = bool(state["sized"])
        self.step_changed_at = int(state["step_changed_at"])
        self.measuring = bool(state.get("measuring", True))
        self.history = [LLCEstimate(**e) for e in state["history"]]
