"""The online estimator's facade: one object that wires chains -> windows -> filter -> records.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. :class:`OnlineLLC` is the user's handle on that flow::

    OnlineLLC.update(batch, step)
      -> ShadowSampler.step(batch)            every `every_n_steps` training steps: draws d, v
      -> WindowStats.update(d, v, step)       every `window` draws: a WindowSummary
      -> LLCFilter.update(mean, se^2, step)   level, band, jump flag
      -> LLCEstimate                          returned, kept in history()

It owns one :class:`~online_llc.track.Track` for the whole model and one per parameter group
(each track holds its chains, windows, filter, warm-up and status policy; the statuses are
described in :mod:`online_llc.track`), schedules their shadow steps, and reports the results:
the records of :mod:`online_llc.records`, the chains' health, checkpoints.
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
from .track import MAX_AUTO_WARMUP, MIN_AUTO_WARMUP, MIN_REWARMUP, Track  # noqa: F401 - also importable from here
from .tuning import DEFAULT_MAX_TEMPERATURE
from .window import WindowStats

__all__ = ["ChainHealth", "LLCEstimate", "OnlineLLC", "STATUSES", "SmoothedPoint", "Transition"]

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

        def track(evaluator: LossEvaluator, track_seed: int, masks: Optional[Dict[str, Any]] = None) -> Track:
            return Track(
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
        self._groups: Dict[str, Track] = {
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

    def _group(self, name: str) -> Track:
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
