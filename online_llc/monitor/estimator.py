"""The online estimator's facade: one object that wires chains -> windows -> filter -> records.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. :class:`OnlineLLC` is the user's handle on that flow::

    OnlineLLC.update(batch, step)
      -> ShadowSampler.step(batch)            every `every_n_steps` training steps: draws d, v
      -> WindowStats.update(d, v, step)       every `window` draws: a WindowSummary
      -> LLCFilter.update(mean, se^2, step)   level, band, jump flag
      -> LLCEstimate                          returned, kept in history()

It owns one :class:`~online_llc.monitor.track.Track` (chains, windows, filter, warm-up, statuses)
for the whole model and one per parameter group, schedules their shadow steps and reports the
records (:mod:`online_llc.records`), health and checkpoints; options: :mod:`online_llc.monitor.settings`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from scipy.stats import norm as _normal
from torch import nn

from online_llc.calibration.step import DEFAULT_MAX_HEAT
from online_llc.config import SGLDConfig
from online_llc.kernel.evaluator import LossEvaluator, LossFn, check_first_batch
from online_llc.kernel.fsdp import is_fsdp2, make_evaluator
from online_llc.models.groups import resolve_group_masks
from online_llc.monitor.cadence import group_budget
from online_llc.monitor.distributed import rank_seed, rejoin
from online_llc.monitor.health import chain_health
from online_llc.monitor.schedule import Schedule
from online_llc.monitor.checkpoint import load_monitor_state, monitor_state
from online_llc.monitor.probes import OnlineProbes, probe_sets, set_influence, susceptibilities
from online_llc.monitor.settings import MonitorSettings
from online_llc.monitor.shadow import ShadowSampler
from online_llc.monitor.track import Track
from online_llc.monitor.window import WindowStats
from online_llc.records import ChainHealth, LLCEstimate, ProbeResult, SmoothedPoint, Transition
from online_llc.stats.filter import LLCFilter

__all__ = ["OnlineLLC"]


class OnlineLLC:
    """A running estimate of the local learning coefficient of a model while it trains.

    Call :meth:`update` after every optimizer step with that step's batch. Every
    ``every_n_steps`` steps it runs one SGLD step of a shadow chain centred at the current weights
    (see :mod:`online_llc.monitor.shadow`); every ``window`` shadow steps it summarizes the draws and
    feeds the window mean to a local-linear-trend filter, returning an :class:`LLCEstimate`.
    The estimated quantity is the same as :func:`online_llc.estimate_llc`'s at the same
    ``nbeta``, ``localization`` and ``step_size``.

    Cost per shadow step and chain: a forward pass at the centre, a forward and backward pass
    at the sample and Gaussian noise for every parameter (with the control-variate gradient, a
    backward pass at the centre too): 1.7-2.1 training steps on the small CPU MLP of
    ``benchmarks/overhead.py``, an overhead of 1.05-1.08 at the default 35. ``every_n_steps`` and ``window``
    trade overhead against lag: a window spans ``every_n_steps * window`` training steps, and
    the estimate follows a change within one or two windows. Given ``total_steps``, the
    ``"auto"`` defaults fit them to the run (:mod:`online_llc.monitor.cadence`; one warning when the run
    is too short for the 10% overhead budget says what it costs).

    The shadow passes run with the model in eval mode (``mode="eval"``: no dropout, BatchNorm on
    its running statistics, every ``training`` flag restored after): the deterministic model's LLC.

    The model, its ``.grad`` fields, its buffers, the optimizer and the global RNG streams are
    never touched: training with the monitor is bit-identical to training without it.

    Args:
        model: the network being trained.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses.
        num_samples: ``n``, the size of the training set.
        groups: parameter groups whose weight-refined LLC is tracked beside the whole model's
            (Wang et al. 2024: sample only the group's weights, the rest held at the current
            weights): a mapping of name to parameter-name patterns (``fnmatch``), modules or
            parameters; see :mod:`online_llc.models.groups` for helpers. Groups must be disjoint.
        gather: for distributed training, a collective that concatenates every rank's window
            draws along the chain axis (see :class:`online_llc.monitor.window.WindowStats`); every rank
            then holds the same window summaries and the same filter state. In an initialized
            ``torch.distributed`` process group the chains of rank ``r`` are then seeded from
            ``seed + 104729 r`` (:func:`online_llc.monitor.distributed.rank_seed`), so the same ``seed``
            on every rank still gives independent chains; outside one, give each rank its own
            ``seed``. After resuming every rank from one rank's checkpoint, call
            :meth:`reseed_for_rank`.
        probes: ``{name: batch or iterable of batches}``: fixed samples the chains evaluate at every shadow step,
            for each set's observable-refined LLC (a band), each sample's Bayesian influence (:attr:`probes`) and
            each group's susceptibility (:meth:`susceptibilities`; :mod:`online_llc.monitor.probes`).
        **options: the monitor's options (the sampler's knobs, the chains, the cadence, the
            filter), each a field of :class:`online_llc.monitor.settings.MonitorSettings`, where they are
            described, defaulted and validated. An unknown name raises ``TypeError``. ``seed``
            is the user's seed: rank 0 (and a run without ``gather``) uses it as it is.

    Attributes:
        settings: the validated options (a :class:`~online_llc.monitor.settings.MonitorSettings`).
        config: the sampler's hyperparameters, defaults filled in.
        seed: the chains' seed of this process (the user's, or derived from it and the rank).

    Example:
        >>> import torch
        >>> from online_llc import OnlineLLC
        >>> from online_llc.models.toy import deep_linear_problem
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
        groups: Optional[Mapping[str, Any]] = None,
        gather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        probes: Optional[Mapping[str, Any]] = None,
        **options: Any,
    ) -> None:
        MonitorSettings.reject_unknown("OnlineLLC()", options)
        self.settings = settings = MonitorSettings(num_samples=num_samples, **options)
        self.config = settings.sgld_config()  # raises for a missing num_samples
        self.num_samples: int = settings.num_samples  # type: ignore[assignment]
        #: The schedule (:class:`online_llc.monitor.cadence.Cadence`): ``"auto"`` options resolved.
        self.cadence = cadence = settings.cadence()
        if cadence.message is not None:
            warnings.warn(cadence.message, UserWarning, stacklevel=2)
        self.every_n_steps = cadence.every_n_steps
        self.window = cadence.window
        self.num_chains = settings.num_chains
        self.seed = rank_seed(settings.seed, gather)
        self.warmup = settings.warmup_policy
        self.confidence = float(settings.confidence)
        self._z = float(_normal.ppf(0.5 + self.confidence / 2))
        if is_fsdp2(model) and gather is not None:
            raise ValueError(
                "Expected `gather` to be None for a model sharded by FSDP2: its chains span all ranks (each "
                "rank holds its shards of every chain), so every rank already holds every draw."
            )
        self.evaluator = make_evaluator(model, loss_fn, mode=settings.mode, compile=settings.compile_mode)
        if self.evaluator.sharded and settings.gradient == "control_variate":  # it runs on whole parameters
            raise ValueError("Expected gradient='auto' or 'plain' for a model sharded by FSDP2, got 'control_variate'.")

        def track(evaluator: LossEvaluator, track_seed: int, masks: Optional[Dict[str, Any]] = None) -> Track:
            return Track.build(evaluator, self.config, settings, cadence, seed=track_seed, masks=masks, gather=gather, z=self._z)

        self._model = track(self.evaluator, self.seed)
        # Each group's chains move only its own parameters (disjoint: together one copy of them).
        resolved = resolve_group_masks(model, groups) if groups is not None else {}
        self._groups: Dict[str, Track] = {
            name: track(make_evaluator(model, loss_fn, list(masks), settings.mode, settings.compile_mode), self.seed + 7919 * (i + 1), masks)
            for i, (name, masks) in enumerate(resolved.items())
        }
        self.group_budget = group_budget(settings.group_budget, len(self._groups), cadence, settings.warmup_policy)
        self._probe_sets = probe_sets(probes, self.evaluator, settings)
        self._init_counters()

    def _init_counters(self) -> None:
        #: The step counters and the tracks' draws (:class:`online_llc.monitor.schedule.Schedule`).
        self.schedule = Schedule(self.every_n_steps, list(self._groups), self.group_budget)
        self._checked = False  # whether the first batch was checked
        self.last_group_estimates: Dict[str, LLCEstimate] = {}
        #: The probe sets' live estimates (:class:`~online_llc.monitor.probes.OnlineProbes`), or ``None``;
        #: ``group_probes``: the same beside each group's chains (their susceptibilities).
        self.probes = None if self._probe_sets is None else OnlineProbes.build(self._probe_sets, self)
        self.group_probes: Dict[str, OnlineProbes] = {} if self._probe_sets is None else {
            n: OnlineProbes.build(self._probe_sets, self, t) for n, t in self._groups.items()}
        self._track_probes = {id(self._model): self.probes, **{id(t): self.group_probes.get(n) for n, t in self._groups.items()}}

    @property
    def step(self) -> int:
        """The last training step recorded (0 before the first)."""
        return self.schedule.step

    @property
    def shadow_steps(self) -> int:
        """Shadow steps so far (a placeholder step of :meth:`skip_step` counts)."""
        return self.schedule.shadow_steps

    @property
    def chain_config(self) -> SGLDConfig:
        """The whole-model chains' settings now (calibrated step, gradient); ``config``: as built."""
        return self._model.sampler.config

    # ---- the public loop --------------------------------------------------------------------------
    def update(self, batch: Any, step: Optional[int] = None) -> Optional[LLCEstimate]:
        """Record that an optimizer step happened; run a shadow step when one is due.

        The first call checks ``loss_fn`` on its batch (one extra forward pass): one loss per sample
        of the batch, and no more samples than ``num_samples``.

        Args:
            batch: the batch of the optimizer step (what ``loss_fn`` takes).
            step: the training step just completed (1 after the first optimizer step; any
                integer type); ``None`` counts calls. Each step is recorded once: a step equal to
                or before the previous one raises ``ValueError``.

        Returns:
            An :class:`LLCEstimate` when a window closed at this step, else ``None``.

        Raises:
            ValueError: a repeated or decreasing ``step``; at the first call, a ``loss_fn`` that
                does not return one loss per sample, or a batch larger than ``num_samples``.
        """
        step = self.schedule.advance(step)
        if not self._checked:
            gen = torch.Generator(device=self.sampler.device).manual_seed(self.seed)
            check_first_batch(self.evaluator, batch, self.num_samples, gen)
            self._checked = True
        if step is None:
            return None
        return self._draw(step, lambda t, k: self._probed(t, step, lambda: t.shadow_step(batch, step, k)))

    def _probed(self, t: Track, step: int, run: Callable[[], Optional[LLCEstimate]], skip: bool = False) -> Any:
        """A track's draw (``run``), with its probe sets' passes beside it."""
        probes = self._track_probes.get(id(t))
        if probes is None:
            return run()
        if skip:
            probes.skip(step)
            return run()
        probes.before(t.sampler)
        est = run()
        probes.after(t.sampler.last, step)
        return est

    def _draw(self, step: int, draw: Callable[[Track, int], Optional[LLCEstimate]]) -> Optional[LLCEstimate]:
        self.last_group_estimates = {}  # stays empty when a draw raises
        est, self.last_group_estimates = self.schedule.draw(step, {None: self._model, **self._groups}, draw)
        if est is not None and self.probes is not None:
            self.probes.close(est, self.chain_config)
        for name in set(self.last_group_estimates) & set(self.group_probes):
            self.group_probes[name].close(self.last_group_estimates[name], self._groups[name].sampler.config)
        return est

    def susceptibilities(self) -> Dict[str, Dict[str, Tuple[float, float]]]:
        """``{group: {probe set: (susceptibility, its standard error)}}`` (:func:`~online_llc.monitor.probes.susceptibilities`)."""
        return susceptibilities(self.group_probes)

    def influence(self, name: str) -> Optional[ProbeResult]:
        """Probe set ``name``'s influences, kernel and susceptibility (:func:`~online_llc.monitor.probes.set_influence`)."""
        return set_influence(self.probes, name)

    def skip_step(self, step: Optional[int] = None) -> Optional[LLCEstimate]:
        """Advance the step counter without sampling, adding flagged placeholder draws when a
        shadow step is due.

        For distributed training: a rank whose monitor failed keeps calling this instead of
        :meth:`update`, so that every rank still closes each window, and joins its collective,
        at the same step. The windows it touches are reported as ``diverged`` on every rank.
        Called with the step of an :meth:`update` that raised (see :attr:`owes_draw`), it adds
        placeholders for exactly the tracks (the whole model, the due groups) whose draw is still
        owed: the step is not recorded twice, nor the groups' round-robin advanced twice.
        """
        if not self.schedule.is_owed(step):
            step = self.schedule.advance(step)
            if step is None:
                return None
        return self._draw(step, lambda t, k: self._probed(t, step, lambda: t.skip(step, k), skip=True))

    @property
    def owes_draw(self) -> bool:
        """Whether the latest due step still owes draws: an :meth:`update` raised before every due
        track (the whole model, the due groups) added its draw. Under DDP, call
        ``skip_step(step)`` with that step then, so that every track's windows close, and join
        their collectives, at the same steps on every rank."""
        return bool(self.schedule.owed)

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
        """The latest *estimate* of every group: its last window the filter absorbed (``None`` before
        the first; a later warm-up or diverged window is in :meth:`group_history`)."""
        return {name: next((e for e in reversed(t.history) if e.filtered), None) for name, t in self._groups.items()}

    def group_band(self, name: str, step: Optional[int] = None) -> Tuple[float, float]:
        """Group ``name``'s predicted mean and std at ``step`` (default: the current step): the
        band widens across the gap since the group was last observed (and, like every band,
        with the level's slope: :func:`~online_llc.monitor.policy.lag_std`)."""
        return self._group(name).band_at(self.step if step is None else step)

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

    def health(self, max_heat: float = DEFAULT_MAX_HEAT) -> ChainHealth:
        """The whole-model chains' health, with an alarm when something needs the user.

        The heat alarm fires when the heat (minibatch and discretization,
        :mod:`online_llc.calibration.heat`) measured over the last ``HEALTH_WINDOWS`` measured
        tracking windows at the current step exceeds ``max_heat``: the gradient noise and the
        step's finite size then raise the estimate by more than ``max_heat - 1``. With the
        calibrated default step it fires only when the step cannot be lowered enough (a
        ``step_size`` given by hand, or a step already at the calibration's floor). See
        :func:`online_llc.monitor.health.chain_health`.
        """
        return chain_health(self._model, max_heat, self.cadence.total_steps, self.every_n_steps)

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
        self._init_counters()  # the probe sets' statistics too

    # ---- checkpointing ----------------------------------------------------------------------------
    def reseed_for_rank(self, rank: int) -> None:
        """Make this rank's chains its own again after every rank loaded the same checkpoint.

        Call it on every rank right after :meth:`load_state_dict` when the ranks restored one
        rank's state (Lightning saves rank 0's only). Every track (the whole model and each
        group) reseeds its generators from this monitor's seed and drops its half-filled window;
        on ``rank > 0`` every chain restarts its warm-up, keeping its offsets, so its draws,
        correlated with rank 0's at first, are flagged until it re-equilibrates (see
        :func:`online_llc.monitor.distributed.rejoin`).
        """
        if self.evaluator.sharded:  # FSDP2: a chain spans all ranks, nothing to make a rank's own
            return
        rejoin([self._model, *self._groups.values()], rank)

    def state_dict(self, shards: bool = False) -> Dict[str, Any]:
        """Everything needed to continue exactly: chains (offsets and generator states, as
        tensors), windows, filters, counters and histories (plain Python values). Sharded by
        FSDP2, the chains are gathered to full tensors on every rank (a collective); with
        ``shards``, a rank's own shards (1/R, no collective), which restore that rank or, merged
        (:func:`online_llc.monitor.shards.merge_shards`), any world size or unsharded monitor."""
        return monitor_state(self, shards)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a monitor with the same settings (and probe sets)."""
        load_monitor_state(self, state)
