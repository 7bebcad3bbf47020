"""The online estimator: shadow chain -> window statistics -> filter -> ``LLCEstimate`` records.

Data flows one way::

    OnlineLLC.update(batch, step)
      -> ShadowSampler.step(batch)            every `every_n_steps` training steps: draws d, v
      -> WindowStats.update(d, v, step)       every `window` draws: a WindowSummary
      -> LLCFilter.update(mean, se^2, step)   level, band, jump flag
      -> LLCEstimate                          returned, kept in history()

Statuses (``LLCEstimate.status``):

* ``warming_up``: the window holds draws from a chain that has not yet equilibrated: at the
  start, after a chain reset, or after the training weights jumped (see
  :mod:`online_llc.warmup`; with ``warmup="auto"`` equilibrium is detected from the draws and the
  offset norm, otherwise it is a fixed count of shadow steps). The record shows the raw window
  mean; the filter is not fed.
* ``diverged``: a chain produced a non-finite draw or ran away during this window; it was reset
  (counted in ``divergences``), its draw replaced by a flagged placeholder, and the window was
  not fed to the filter (its raw mean includes the placeholders' zeros).
* ``transition``: the window was a jump (a many-sigma surprise, or the first window after a jump
  of the training weights) or followed one: the LLC is moving fast.
* ``not_at_minimum``: the band lies entirely below zero: the sampler finds lower loss nearby, as
  at saddles and plateaus; the LLC is not defined there in the usual sense.
* ``tracking``: otherwise.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from scipy.stats import norm as _normal
from torch import nn

from .config import (
    DEFAULT_EVERY_N_STEPS,
    DEFAULT_HORIZON,
    DEFAULT_LOCALIZATION,
    DEFAULT_WARMUP,
    DEFAULT_WINDOW,
    resolve_hyperparameters,
)
from .errors import check_nonneg_int, check_positive_float, check_positive_int, reject_unknown
from .filter import LLCFilter
from .groups import resolve_group_masks
from .records import STATUSES, ChainHealth, LLCEstimate, SmoothedPoint, Transition
from .shadow import ShadowSampler
from .sgld import LossEvaluator, LossFn
from .tuning import DEFAULT_MAX_TEMPERATURE
from .warmup import EquilibrationDetector
from .window import WindowStats, WindowSummary

__all__ = ["ChainHealth", "LLCEstimate", "OnlineLLC", "STATUSES", "SmoothedPoint", "Transition"]

#: The longest data-driven warm-up, in shadow steps: a chain that never looks settled (one that
#: keeps following fast training, say) is used after this many draws anyway.
MAX_AUTO_WARMUP = 400
#: The shortest data-driven warm-up of a chain that starts at zero offset (start, reset).
MIN_AUTO_WARMUP = 100
#: The shortest one after a jump of the weights (the chains keep their offsets).
MIN_REWARMUP = 60
# Shadow steps of centre movement seen before a weight jump can be declared.
_MIN_SHIFT_HISTORY = 10


#: Filtered windows whose consistency :meth:`OnlineLLC.health` takes the median of.
HEALTH_WINDOWS = 10


class OnlineLLC:
    """A running estimate of the local learning coefficient of a model while it trains.

    Call :meth:`update` after every optimizer step with that step's batch. Every
    ``every_n_steps`` steps it runs one SGLD step of a shadow chain centred at the current weights
    (see :mod:`online_llc.shadow`); every ``window`` shadow steps it summarizes the draws and
    feeds the window mean to a local-linear-trend filter, returning an :class:`LLCEstimate`.
    The estimated quantity is the same as :func:`online_llc.estimate_llc`'s at the same
    ``nbeta``, ``localization`` and ``step_size``.

    Cost: one forward+backward and one forward pass on one batch per shadow step, plus Gaussian
    noise for every parameter: 1.3-2x a training step, so the overhead is about
    ``2 / every_n_steps`` per chain (8% at the default 25 on a small MLP). ``every_n_steps`` and ``window``
    trade overhead against lag: a window spans ``every_n_steps * window`` training steps, and
    the estimate follows a change within one or two windows.

    The model, its ``.grad`` fields, its buffers, the optimizer and the global RNG streams are
    never touched: training with the monitor is bit-identical to training without it.

    Args:
        model: the network being trained.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses.
        num_samples: ``n``, the size of the training set.
        nbeta: ``n * beta``; ``None`` means ``n / log n``.
        localization: ``gamma``.
        step_size: the sampler's ``epsilon``; ``None`` means its default
            (:func:`online_llc.config.resolve_hyperparameters`: ``0.15 / nbeta`` for SGLD).
        every_n_steps: training steps between shadow steps (>= 1).
        window: draws per chain per window (>= 2).
        num_chains: chains run at each shadow step.
        seed: seeds the chains' private generators.
        warmup: how long a chain warms up after the start, a reset or a jump of the training
            weights (its windows are reported as ``warming_up`` and kept out of the filter):
            ``"auto"`` (the default, ``None``) detects equilibrium from the chain's draws and
            offset norm (MSER-5, :mod:`online_llc.warmup`; at least :data:`MIN_AUTO_WARMUP`
            (60 after a jump of the weights) and at most :data:`MAX_AUTO_WARMUP` shadow steps); an int is a fixed number of shadow steps.
        confidence: coverage of the ``lower``/``upper`` band, in (0, 1).
        process_noise: see :class:`online_llc.filter.LLCFilter`.
        jump_threshold: see :class:`online_llc.filter.LLCFilter`.
        max_offset_norm: see :class:`online_llc.shadow.ShadowSampler`.
        groups: parameter groups whose weight-refined LLC is tracked beside the whole model's
            (Wang et al. 2024: sample only the group's weights, the rest held at the current
            weights): a mapping of name to parameter-name patterns (``fnmatch``), modules or
            parameters; see :mod:`online_llc.groups` for helpers. Groups must be disjoint.
        group_budget: group shadow steps per shadow step, spent round-robin over the groups:
            the overhead does not grow with the number of groups, each group is observed every
            ``len(groups) / group_budget`` shadow steps, and its band widens in between.
        gather: for distributed training, a collective that concatenates every rank's window
            draws along the chain axis (see :class:`online_llc.window.WindowStats`); every rank
            then holds the same window summaries and the same filter state. Give each rank its
            own ``seed``.
        sampler: ``"sgld"`` (default), ``"rmsprop_sgld"`` or ``"sghmc"`` (its momentum or
            moments are part of the chain state and checkpointed).
        friction: SGHMC's friction ``alpha`` in (0, 1].

    Example:
        >>> import torch
        >>> from online_llc import OnlineLLC
        >>> from online_llc.toy import deep_linear_problem
        >>> p = deep_linear_problem([6, 6, 6], r=2, num_samples=2048, seed=0)
        >>> monitor = OnlineLLC(p.model, p.loss_fn, num_samples=2048, every_n_steps=1, window=50)
        >>> batches = list(p.batches)
        >>> for step in range(300):          # frozen weights (lr = 0): 300 shadow steps, 6 windows
        ...     est = monitor.update(batches[step % len(batches)])
        >>> monitor.estimate.status, len(monitor.history())
        ('tracking', 6)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        num_samples: int,
        nbeta: Optional[float] = None,
        localization: float = DEFAULT_LOCALIZATION,
        step_size: Optional[float] = None,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        window: int = DEFAULT_WINDOW,
        num_chains: int = 1,
        seed: int = 0,
        warmup: Union[int, str, None] = None,
        confidence: float = 0.9,
        process_noise: float = 0.1,
        jump_threshold: float = 16.0,
        max_offset_norm: Optional[float] = None,
        gather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        sampler: str = "sgld",
        friction: float = 0.1,
        groups: Optional[Mapping[str, Any]] = None,
        group_budget: int = 1,
        **kwargs: Any,
    ) -> None:
        reject_unknown("OnlineLLC()", kwargs)
        self.config = resolve_hyperparameters(
            num_samples=num_samples,
            nbeta=nbeta,
            localization=localization,
            step_size=step_size,
            sampler=sampler,
            friction=friction,
        )
        self.num_samples = num_samples
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"Expected `window` to be an int >= 2, got {window!r}.")
        self.window = window
        self.num_chains = check_positive_int("num_chains", num_chains)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an int, got {seed!r}.")
        self.seed = seed
        if warmup is None:
            warmup = DEFAULT_WARMUP
        if warmup != "auto":
            if isinstance(warmup, str):
                raise ValueError(f"Expected `warmup` to be 'auto' or a non-negative int, got {warmup!r}.")
            check_nonneg_int("warmup", warmup)
        self.warmup: Union[int, str] = warmup
        confidence = check_positive_float("confidence", confidence)
        if confidence >= 1:
            raise ValueError(f"Expected `confidence` to be a float in (0, 1), got {confidence!r}.")
        self.confidence = confidence
        self._z = float(_normal.ppf(0.5 + confidence / 2))

        self.group_budget = check_positive_int("group_budget", group_budget)
        self.evaluator = LossEvaluator(model, loss_fn)

        def track(evaluator: LossEvaluator, track_seed: int, masks: Optional[Dict[str, Any]] = None) -> _Track:
            return _Track(
                ShadowSampler(
                    evaluator,
                    self.config,
                    num_chains=num_chains,
                    seed=track_seed,
                    max_offset_norm=max_offset_norm,
                    masks=masks,
                ),
                WindowStats(window, num_chains, horizon=DEFAULT_HORIZON, gather=gather),
                LLCFilter(process_noise=process_noise, jump_threshold=jump_threshold),
                warmup=self.warmup,
                z=self._z,
            )

        self._model = track(self.evaluator, seed)
        # Each group's chains move only its own parameters (disjoint groups: together their
        # offsets are one copy of the model's trainable parameters).
        resolved = resolve_group_masks(model, groups) if groups is not None else {}
        self._groups: Dict[str, _Track] = {
            name: track(LossEvaluator(model, loss_fn, param_names=list(masks)), seed + 7919 * (i + 1), masks)
            for i, (name, masks) in enumerate(resolved.items())
        }
        self._init_counters()

    def _init_counters(self) -> None:
        self.step = 0
        self.shadow_steps = 0
        self._next_group = 0
        self.last_group_estimates: Dict[str, LLCEstimate] = {}

    # ---- the public loop --------------------------------------------------------------------------
    def update(self, batch: Any, step: Optional[int] = None) -> Optional[LLCEstimate]:
        """Record that an optimizer step happened; run a shadow step when one is due.

        Args:
            batch: the batch of the optimizer step (what ``loss_fn`` takes).
            step: the training step just completed (1 after the first optimizer step); ``None``
                counts calls.

        Returns:
            An :class:`LLCEstimate` when a window closed at this step, else ``None``.
        """
        step = self._advance(step)
        return None if step is None else self._shadow_step(batch, step)

    def _advance(self, step: Optional[int]) -> Optional[int]:
        """Record the training step; return it when a shadow step is due, else ``None``."""
        if step is None:
            step = self.step + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < self.step:
            raise ValueError(f"Expected `step` to be an int >= the previous step {self.step}, got {step!r}.")
        self.step = step
        return step if step % self.every_n_steps == 0 else None

    def _shadow_step(self, batch: Any, step: int) -> Optional[LLCEstimate]:
        # Counted once the whole-model step succeeded: a failing loss leaves the count as it was.
        est = self._model.shadow_step(batch, step, self.shadow_steps + 1)
        self.shadow_steps += 1
        self._step_groups(batch, step)
        return est

    def _step_groups(self, batch: Any, step: int) -> None:
        # A fixed budget of group shadow steps per shadow step, round-robin over the groups:
        # the cost does not grow with the number of groups; each group is observed every
        # len(groups) / group_budget shadow steps and its band widens in between.
        self.last_group_estimates = {}
        for name in self._due_groups():
            est = self._groups[name].shadow_step(batch, step, self.shadow_steps)
            if est is not None:
                self.last_group_estimates[name] = est

    def _due_groups(self) -> List[str]:
        """The next ``group_budget`` groups in round-robin order (each at most once per step)."""
        names = list(self._groups)
        due = []
        for _ in range(min(self.group_budget, len(names))):
            due.append(names[self._next_group % len(names)])
            self._next_group += 1
        return due

    def skip_step(self, step: Optional[int] = None) -> Optional[LLCEstimate]:
        """Advance the step counter without sampling, adding flagged placeholder draws when a
        shadow step is due.

        For distributed training: a rank whose monitor failed keeps calling this instead of
        :meth:`update`, so that every rank still closes each window, and joins its collective,
        at the same step. The windows it touches are reported as ``diverged`` on every rank.
        """
        step = self._advance(step)
        if step is None:
            return None
        self.shadow_steps += 1
        est = self._model.skip(step, self.shadow_steps)
        self.last_group_estimates = {}
        for name in self._due_groups():
            self._groups[name].skip(step, self.shadow_steps)
        return est

    # ---- results ----------------------------------------------------------------------------------
    @property
    def sampler(self) -> ShadowSampler:
        """The whole-model chains."""
        return self._model.sampler

    @property
    def stats(self) -> WindowStats:
        """The whole-model window statistics."""
        return self._model.stats

    @property
    def filter(self) -> LLCFilter:
        """The whole-model filter."""
        return self._model.filter

    @property
    def estimate(self) -> Optional[LLCEstimate]:
        """The latest whole-model estimate (``None`` before the first window closes)."""
        return self._model.history[-1] if self._model.history else None

    def history(self) -> List[LLCEstimate]:
        """All whole-model estimates so far, oldest first (one per window: memory grows by one
        record per ``every_n_steps * window`` training steps)."""
        return list(self._model.history)

    @property
    def groups(self) -> Dict[str, List[str]]:
        """The parameter groups (name -> parameter names) tracked beside the whole model."""
        return {name: list(t.sampler.evaluator.param_names) for name, t in self._groups.items()}

    def group_history(self, name: str) -> List[LLCEstimate]:
        """All estimates of group ``name``'s weight-refined LLC, oldest first."""
        return list(self._group(name).history)

    def group_estimates(self) -> Dict[str, Optional[LLCEstimate]]:
        """The latest estimate of every group (``None`` for a group with no window yet)."""
        return {name: (t.history[-1] if t.history else None) for name, t in self._groups.items()}

    def group_band(self, name: str, step: Optional[int] = None) -> Tuple[float, float]:
        """Group ``name``'s predicted mean and std at ``step`` (default: the current step): the
        band widens across the gap since the group was last observed."""
        t = self._group(name)
        if not t.filter.initialized:
            return math.nan, math.inf
        return t.filter.predict(self.step if step is None else step)

    def _group(self, name: str) -> "_Track":
        if name not in self._groups:
            raise KeyError(f"No group {name!r}; the groups are {list(self._groups)}.")
        return self._groups[name]

    def smoothed(self, group: Optional[str] = None) -> List[SmoothedPoint]:
        """The retrospective curve: the Rauch-Tung-Striebel smoothing of every window the filter
        absorbed (warm-up and diverged windows are not part of it). Each point uses all windows,
        so the curve has no lag and a narrower band than the live one; it changes as windows
        arrive. Memory is bounded by the filter's ``max_history``. ``group``: a group's curve
        instead of the whole model's."""
        return (self._model if group is None else self._group(group)).smoothed()

    def transitions(self, group: Optional[str] = None) -> List[Transition]:
        """Stage boundaries: maximal runs of ``transition`` windows (two runs one quiet window
        apart count as one: a ramp shows as jumps with a pause), with the smoothed level just
        before and just after each (what one would mark by eye on the smoothed curve)."""
        return (self._model if group is None else self._group(group)).transitions()

    @property
    def divergences(self) -> int:
        """Number of whole-model chain resets so far."""
        return self.sampler.divergences

    def health(self, max_temperature: float = DEFAULT_MAX_TEMPERATURE) -> ChainHealth:
        """The whole-model chains' health, with an alarm when something needs the user.

        The step-size alarm fires when the median consistency of the last ``HEALTH_WINDOWS``
        filtered windows exceeds ``max_temperature``: the chain runs grossly hot, which on the
        toy models meant over-estimates of 40% or more (``benchmarks/step_size.py``). Smaller
        step-size biases are invisible to it (a healthy chain's consistency depends on the model
        and the localization); :func:`online_llc.tuning.recommend_step_size` finds them by step
        halving before training.
        """
        max_temperature = check_positive_float("max_temperature", max_temperature)
        # Consistency reads as a temperature only where the LLC is clearly positive (at a
        # minimum): near zero or below (saddles, plateaus) var / mean is meaningless.
        # Newest first, stopping at HEALTH_WINDOWS: the callback asks at every window, and the
        # history grows without bound.
        fed = (e.consistency for e in reversed(self._model.history) if e.status == "tracking" and e.lower > 0)
        recent = [c for c in itertools.islice(fed, HEALTH_WINDOWS) if math.isfinite(c)]
        temperature = float(np.median(recent)) if recent else math.nan
        alarms = []
        if math.isfinite(temperature) and temperature > max_temperature:
            alarms.append(
                f"step size too large: the draws' consistency is {temperature:.2f} > {max_temperature:g} "
                "(the chain runs hot and over-estimates); lower step_size or run "
                "online_llc.tuning.recommend_step_size"
            )
        windows = len(self._model.history)
        if windows >= 4 and self.divergences > windows:
            alarms.append(
                f"chains keep diverging: {self.divergences} resets in {windows} windows, lower step_size or raise "
                "localization"
            )
        return ChainHealth(
            divergences=self.divergences,
            weight_jumps=self.weight_jumps,
            warmup_lengths=self.warmup_lengths,
            temperature=temperature,
            alarms=alarms,
        )

    @property
    def weight_jumps(self) -> int:
        """Number of jumps of the training weights detected so far (each restarts the warm-up)."""
        return self._model.weight_jumps

    @property
    def warmup_lengths(self) -> List[int]:
        """Shadow steps each completed data-driven warm-up of a whole-model chain took, oldest
        first (empty with a fixed ``warmup``)."""
        return list(self._model.warmup_lengths)

    def reset(self) -> None:
        """Start over: chains at zero offset, empty windows, fresh filters, empty histories."""
        for t in [self._model, *self._groups.values()]:
            t.reset()
        self._init_counters()

    # ---- checkpointing ----------------------------------------------------------------------------
    def _settings(self) -> Dict[str, Any]:
        return {
            "sampler": self.config.sampler,
            "nbeta": self.config.nbeta,
            "localization": self.config.localization,
            "step_size": self.config.step_size,
            "every_n_steps": self.every_n_steps,
            "window": self.window,
            "num_chains": self.num_chains,
            "warmup": self.warmup,
            "groups": sorted(self._groups),
            "group_budget": self.group_budget,
        }

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: chains (offsets and generator states, as
        tensors), windows, filters, counters and histories (plain Python values)."""
        state = {
            "version": 1,
            "settings": self._settings(),
            "step": self.step,
            "shadow_steps": self.shadow_steps,
            "next_group": self._next_group,
            "groups": {name: t.state_dict() for name, t in self._groups.items()},
        }
        state.update(self._model.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a monitor with the same settings."""
        if state.get("version") != 1:
            raise ValueError(f"Expected an OnlineLLC state of version 1, got {state.get('version')!r}.")
        mine = self._settings()
        for k, v in state["settings"].items():
            if k not in mine or (mine[k] != v and not (isinstance(v, float) and math.isclose(v, mine[k]))):
                raise ValueError(f"Expected the state's `{k}` to be {mine.get(k)!r} like this monitor's, got {v!r}.")
        self._model.load_state_dict(state)
        for name, t in self._groups.items():
            t.load_state_dict(state["groups"][name])
        self.step = int(state["step"])
        self.shadow_steps = int(state["shadow_steps"])
        self._next_group = int(state.get("next_group", 0))


class _Track:
    """One estimated quantity (the whole model's LLC, or one group's weight-refined LLC): its
    chains, window statistics, filter and history. Owned by :class:`OnlineLLC`."""

    def __init__(
        self, sampler: ShadowSampler, stats: WindowStats, filt: LLCFilter, *, warmup: Union[int, str], z: float
    ) -> None:
        self.sampler, self.stats, self.filter = sampler, stats, filt
        self.warmup, self._z = warmup, z
        self.auto_warmup = warmup == "auto"
        self.num_chains = sampler.num_chains
        self._init()

    def _init(self) -> None:
        self.warmup_left = [0 if self.auto_warmup else self.warmup] * self.num_chains
        self.detectors = [
            EquilibrationDetector(min_draws=MIN_AUTO_WARMUP, max_draws=MAX_AUTO_WARMUP) for _ in range(self.num_chains)
        ]
        self.last_jump = False
        # Set by a jump of the weights: the filter's level is stale, the next fed window resets it.
        self.level_stale = False
        self.weight_jumps = 0
        self.warmup_lengths: List[int] = []
        # Running means of the centre's movement per shadow step and of the chains' offset norm.
        self._shift_mean = math.nan
        self._offset_mean = math.nan
        self._shift_count = 0
        self.history: List[LLCEstimate] = []

    def _restart_warmup(self, c: int, from_zero: bool = True) -> None:
        if self.auto_warmup:
            # A chain restarted at zero offset may sit at a saddle, where it leaves along the
            # unstable directions slowly at first, exponentially later: no test on its first
            # draws can tell that from stationarity (the stagewise demo's chain looked settled
            # after 60 draws and fell from -6 to -2800 over the next 150), so the floor is
            # MIN_AUTO_WARMUP. A chain whose offsets were kept through a weight jump is already
            # spread out and only needs MSER's own minimum.
            self.detectors[c].restart(None if from_zero else MIN_REWARMUP)
        else:
            self.warmup_left[c] = self.warmup

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

    def _weight_jump(self, shift: float, offset_norms: List[float]) -> bool:
        """Whether the training weights jumped since the last shadow step: they moved (at least)
        farther than the chains' own spread and ten times farther than they usually move per
        shadow step. Steady fast training raises the usual movement and does not count; a
        reloaded checkpoint, weight surgery or a switched task does."""
        if not math.isfinite(shift):
            return False
        offset = float(np.mean(offset_norms)) if offset_norms else math.nan
        jump = (
            self._shift_count >= _MIN_SHIFT_HISTORY
            and math.isfinite(self._offset_mean)
            and shift > self._offset_mean
            and shift > 10 * self._shift_mean
        )
        if not jump:  # a jump must not raise the usual movement
            a = 1.0 / min(self._shift_count + 1, 50)
            self._shift_mean = shift if self._shift_count == 0 else (1 - a) * self._shift_mean + a * shift
            self._shift_count += 1
            if math.isfinite(offset):
                self._offset_mean = offset if not math.isfinite(self._offset_mean) else 0.98 * self._offset_mean + 0.02 * offset
        return jump

    def reset(self) -> None:
        for c in range(self.num_chains):
            self.sampler.reset_chain(c)
        self.sampler.divergences = 0
        self.stats.reset()
        self.filter.reset()
        self._init()

    def shadow_step(self, batch: Any, step: int, shadow_steps: int) -> Optional[LLCEstimate]:
        out = self.sampler.step(batch)
        healthy = [i.offset_norm for i, bad in zip(out.infos, out.diverged) if not bad]
        if self._weight_jump(out.center_shift, healthy):
            # The chains' offsets were drawn for the old weights: re-equilibrate all of them.
            self.weight_jumps += 1
            self.level_stale = True
            for c in range(self.num_chains):
                self._restart_warmup(c, from_zero=False)
        # Every chain adds a draw at every shadow step, so windows close (and, under DDP, their
        # collective runs) at the same step on every rank. A reset chain adds a flagged
        # placeholder (its draw is meaningless and may be non-finite); a warming chain a flagged draw.
        d, v, flags = [], [], []
        for c, (info, bad) in enumerate(zip(out.infos, out.diverged)):
            if bad:
                d.append(0.0)
                v.append(0.0)
                flags.append(1)
                self._restart_warmup(c)
            else:
                d.append(info.draw)
                v.append(info.noise_var)
                flags.append(2 if self._warming(c, info.draw, info.offset_norm) else 0)
        summary = self.stats.update(d, v, step, flags=flags)
        return None if summary is None else self._close_window(summary, shadow_steps)

    def skip(self, step: int, shadow_steps: int) -> Optional[LLCEstimate]:
        n = self.num_chains
        summary = self.stats.update([0.0] * n, [0.0] * n, step, flags=[1] * n)
        return None if summary is None else self._close_window(summary, shadow_steps)

    def _close_window(self, s: WindowSummary, shadow_steps: int) -> LLCEstimate:
        status: str
        nis = math.nan
        if s.diverged_draws or s.warmup_draws:
            # Decided from the (gathered) flags: the same verdict on every rank.
            status = "diverged" if s.diverged_draws else "warming_up"
            mean, std, slope = s.mean, s.se, math.nan
            # Unequilibrated draws must not inform later windows' autocorrelation estimates.
            self.stats.clear_history()
        else:
            r = max(s.se**2, 1e-300)
            r_test = max(s.se_window**2, 1e-300)
            mean, std, info = self.filter.update(s.mean, r, s.end_step, r_test=r_test, force_jump=self.level_stale)
            self.level_stale = False
            slope, nis = self.filter.slope, info.nis
            if info.jump or self.last_jump:
                status = "transition"
            elif mean + self._z * std < 0:
                status = "not_at_minimum"
            else:
                status = "tracking"
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
            consistency=s.consistency,
            ess=s.ess,
            nis=nis,
            window_start=s.start_step,
            shadow_steps=shadow_steps,
            divergences=self.sampler.divergences,
        )
        self.history.append(est)
        return est

    def smoothed(self) -> List[SmoothedPoint]:
        steps, mean, std, slope = self.filter.smooth()
        z = self._z
        return [
            SmoothedPoint(int(t), float(m), float(s), float(m - z * s), float(m + z * s), float(b))
            for t, m, s, b in zip(steps, mean, std, slope)
        ]

    def transitions(self) -> List[Transition]:
        smooth = {p.step: p.mean for p in self.smoothed()}
        hist = self.history
        # Runs of consecutive transition windows, as [first, last] indices into the history; two
        # runs one quiet window apart are one boundary (a ramp shows as jumps with a pause).
        runs: List[List[int]] = []
        for i, e in enumerate(hist):
            if e.status != "transition":
                continue
            if runs and i - runs[-1][1] <= 2:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        out: List[Transition] = []
        for first, last in runs:
            before = [e for e in hist[:first] if e.step in smooth and e.status != "transition"]
            after = [e for e in hist[last + 1 :] if e.step in smooth and e.status != "transition"]
            out.append(
                Transition(
                    start=hist[first].window_start,
                    end=hist[last].step,
                    level_before=smooth[before[-1].step] if before else math.nan,
                    level_after=smooth[after[0].step] if after else smooth.get(hist[last].step, hist[last].mean),
                )
            )
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {
            "warmup_left": list(self.warmup_left),
            "detectors": [det.state_dict() for det in self.detectors],
            "weight_jumps": self.weight_jumps,
            "level_stale": self.level_stale,
            "warmup_lengths": list(self.warmup_lengths),
            "shift": [self._shift_mean, self._offset_mean, self._shift_count],
            "last_jump": self.last_jump,
            "sampler": self.sampler.state_dict(),
            "window_stats": self.stats.state_dict(),
            "filter": self.filter.state_dict(),
            "history": [e.to_dict() for e in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.stats.load_state_dict(state["window_stats"])
        self.filter.load_state_dict(state["filter"])
        self.warmup_left = [int(w) for w in state["warmup_left"]]
        for det, st in zip(self.detectors, state["detectors"]):
            det.load_state_dict(st)
        self.weight_jumps = int(state["weight_jumps"])
        self.level_stale = bool(state["level_stale"])
        self.warmup_lengths = [int(k) for k in state["warmup_lengths"]]
        self._shift_mean, self._offset_mean = float(state["shift"][0]), float(state["shift"][1])
        self._shift_count = int(state["shift"][2])
        self.last_jump = bool(state["last_jump"])
        self.history = [LLCEstimate(**e) for e in state["history"]]
