"""The online monitor's options, listed, defaulted and validated in one place.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. The options reach every stage of that flow: the chains (``num_samples``, ``nbeta``, ``localization``,
``step_size``, ``sampler``, ``friction``, ``num_chains``, ``seed``, ``max_offset_norm``, ``mode``,
``measure_discretization``, ``measure_every``, ``gradient``, ``compile``), the probe sets (``probe_kernel``, ``probe_loss_fn``), the
schedule and windows (``every_n_steps``, ``window``, ``total_steps``, ``warmup``, ``group_budget``;
:mod:`online_llc.monitor.cadence` sizes them to the run) and the filter
(``process_noise``, ``jump_threshold``, ``confidence``). :class:`online_llc.OnlineLLC` and the
Lightning callback both take them as keyword arguments and hold them as one
:class:`MonitorSettings`, so a new option is added here once. How the defaults were chosen is
written in :mod:`online_llc.config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Optional, Tuple, Union

from online_llc.calibration.step import resolve_hyperparameters
from online_llc.config import SGLDConfig
from online_llc.errors import (
    as_int,
    check_bool,
    check_choice,
    check_int,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    reject_unknown,
)
from online_llc.kernel.compiled import check_compile
from online_llc.kernel.evaluator import MODES
from online_llc.kernel.probes import check_probe_loss_fn
from online_llc.monitor.cadence import AUTO, DEFAULT_WARMUP, Cadence, auto_cadence, check_cadence_option
from online_llc.monitor.policy import GRADIENT_OPTIONS, MEASURE_EVERY

__all__ = ["MonitorSettings", "check_saved_settings"]


@dataclass(frozen=True)
class MonitorSettings:
    """The options of the online monitor, validated on construction; values are kept as given
    (integers of any kind, numpy's and 0-d tensors included, as Python ints).

    Attributes:
        num_samples: ``n``, the size of the training set; ``None`` while it is not known yet
            (the Lightning callback then reads it from the train dataloader).
        nbeta: ``n * beta``; ``None`` means ``min(n / log n, 256)``, as offline.
        localization: ``gamma``; ``None`` means ``0.09 * nbeta`` (stronger than offline's
            ``0.2 * sqrt(nbeta)``, so the co-moving chain relaxes within a few windows; see
            :mod:`online_llc.config`).
        step_size: the sampler's ``epsilon``; ``None``: ``min(0.15 / nbeta, 0.15 B / nbeta^2)``
            for the first batch's size ``B``, lowered when the measured heat of recent windows
            (minibatch and discretization) is past 1.1 for one chain, less for more chains
            (:func:`online_llc.calibration.step.cooling_excess`); a given step is used as it is.
        every_n_steps: training steps between shadow steps (>= 1), or ``"auto"`` (the default):
            sized to ``total_steps`` by :func:`online_llc.monitor.cadence.auto_cadence` (35 when the
            length is unknown or 35000 steps and more; denser for shorter runs, down to every
            step, and over the 10% overhead budget below 30000 steps, which one warning states).
        window: draws per chain per window (>= 2), or ``"auto"`` (the default): sized to
            ``total_steps`` (40 when the length is unknown, at least 10).
        total_steps: the run's length in optimizer steps, when known (the Lightning callback
            reads ``trainer.estimated_stepping_batches``). It sizes the ``"auto"`` options and,
            for runs too short for a 100-step warm-up within their first 10%, shortens the
            data-driven warm-up in proportion (:mod:`online_llc.monitor.cadence`).
        mode: the model's mode during the shadow passes: ``"eval"`` (the default: dropout off,
            BatchNorm on its running statistics, so the estimate is the deterministic model's),
            ``"train"`` (dropout masks drawn from the monitor's private generator) or
            ``"as_is"`` (whatever mode the model is in). Every submodule's ``training`` flag is
            restored after each pass.
        num_chains: chains run at each shadow step.
        seed: seeds the chains' private generators.
        warmup: how long a chain warms up after the start, a reset or a jump of the training
            weights (its windows are reported as ``warming_up`` and kept out of the filter):
            ``"auto"`` (the default, ``None``) detects equilibrium from the chain's draws and
            offset norm (MSER-5, :mod:`online_llc.monitor.warmup`; at least
            :data:`online_llc.monitor.track.MIN_AUTO_WARMUP` (60 after a jump of the weights) and at most
            :data:`online_llc.monitor.track.MAX_AUTO_WARMUP` shadow steps); an int is a fixed number of
            shadow steps.
        confidence: coverage of the ``lower``/``upper`` band, in (0, 1).
        process_noise: see :class:`online_llc.stats.filter.LLCFilter`.
        jump_threshold: see :class:`online_llc.stats.filter.LLCFilter`.
        max_offset_norm: see :class:`online_llc.monitor.shadow.ShadowSampler`.
        sampler: ``"sgld"`` (default), ``"rmsprop_sgld"`` or ``"sghmc"`` (its momentum or
            moments are part of the chain state and checkpointed).
        friction: SGHMC's friction ``alpha`` in (0, 1].
        group_budget: group shadow steps per shadow step, spent round-robin over the groups
            (an int >= 1: each group is observed every ``len(groups) / group_budget`` shadow
            steps, and its band widens in between), or ``"auto"`` (the default): for a run of
            known length, the fewest that estimate every group within the run's first half, at
            most one step per group (:func:`online_llc.monitor.cadence.group_budget`; a warning
            when that cannot be met, and budget 1 with a warning when the length is unknown).
            Each group step costs about a shadow step of the whole model.
        measure_discretization: measure how much the step's finite size raises the draws, from
            each chain's consecutive updates (:mod:`online_llc.calibration.heat`), and count it in the heat
            the step is cooled on (True, the default). It costs half a copy of the sampled
            parameters per chain in measuring windows (its last update, in bfloat16; a float32
            copy for RMSProp-SGLD); False saves it and
            leaves a stiff model's discretization heat unseen. Not measured for SGHMC.
        measure_every: how often the heat (minibatch and discretization) is measured, an int
            >= 1: every window while a regime's heat is not yet known (after a warm-up, a
            divergence, a change of the step) and then one window in ``measure_every`` (4 by
            default; 1 measures every window). A measuring window's shadow steps split the batch
            into halves and keep each chain's last update; the others run the plain step, about
            a quarter cheaper, and report the heat as NaN
            (:func:`online_llc.monitor.policy.measuring`).
        gradient: the chains' gradient: ``"auto"`` (the default) takes the control-variate
            gradient ``grad L_B(w* + xi) - grad L_B(w*) + A`` where the batch is small,
            ``B < nbeta / 2`` (SGLD and SGHMC on whole parameters, with the step left to the
            monitor), and the plain minibatch gradient otherwise; ``"plain"`` or
            ``"control_variate"`` force one. ``A`` is the running mean of the centre's batch
            gradients (:class:`online_llc.kernel.anchor.RunningAnchor`, reset when the weights
            jump). With it the step is not throttled by the minibatch heat: it starts at
            ``0.15 / nbeta`` and the chain relaxes ``nbeta / (2 B)``-fold faster, for one more
            backward pass at the centre per shadow step and one float32 copy of the sampled
            parameters (the anchor, shared by the chains). ``monitor.chain_config.gradient`` says
            which was taken (:func:`online_llc.monitor.policy.sized_config`).
        compile: run ``loss_fn`` in the shadow passes through ``torch.compile`` (opt-in): ``False``
            (the default), ``True`` (mode ``"default"``) or one of ``torch.compile``'s modes
            (:data:`online_llc.kernel.compiled.COMPILE_MODES`; ``"reduce-overhead"`` captures CUDA
            graphs). The chain is the eager chain to float rounding; the first shadow steps wait
            for the compiler (:mod:`online_llc.kernel.compiled`). Not for a model sharded by FSDP2.
        probe_kernel: with ``probes``, also each probe set's loss kernel ``Cov(delta_k, delta_j)``
            (``K x K`` per set, in ``monitor.probes.influence()``; refused where its sums would
            pass 1 GiB, :mod:`online_llc.monitor.probes`).
        probe_loss_fn: with ``probes``, the probe sets' own loss ``probe_loss_fn(model, batch)``, a
            tensor of any shape whose entries are the probes (per token: ``[B, T]``,
            ``reduction="none"``); ``None`` (the default): ``loss_fn``, one probe per sample.

    Raises:
        ValueError: naming the first invalid option and what it accepts.
    """

    num_samples: Optional[int] = None
    nbeta: Optional[float] = None
    localization: Optional[float] = None
    step_size: Optional[float] = None
    every_n_steps: Union[int, str] = AUTO
    window: Union[int, str] = AUTO
    num_chains: int = 1
    seed: int = 0
    warmup: Union[int, str, None] = None
    confidence: float = 0.9
    process_noise: float = 0.1
    jump_threshold: float = 16.0
    max_offset_norm: Optional[float] = None
    sampler: str = "sgld"
    friction: float = 0.1
    group_budget: Union[int, str] = AUTO
    total_steps: Optional[int] = None
    mode: str = "eval"
    measure_discretization: bool = True
    measure_every: int = MEASURE_EVERY
    gradient: str = "auto"
    compile: Union[bool, str] = False
    probe_kernel: bool = False
    probe_loss_fn: Optional[Callable[..., Any]] = None

    def __post_init__(self) -> None:
        def normalize(name: str, value: Any) -> None:  # a frozen dataclass: set through object
            object.__setattr__(self, name, value)

        # n and the sampler's knobs, checked by the same function and in the same order as when
        # the monitor resolves them; before n is known, n = 2 stands in (it only sets defaults).
        if self.num_samples is not None:
            normalize("num_samples", check_positive_int("num_samples", self.num_samples))
        self._resolve(2 if self.num_samples is None else self.num_samples)
        normalize("every_n_steps", check_cadence_option("every_n_steps", self.every_n_steps, 1))
        normalize("window", check_cadence_option("window", self.window, 2))
        if self.total_steps is not None:
            normalize("total_steps", check_positive_int("total_steps", self.total_steps))
        normalize("num_chains", check_positive_int("num_chains", self.num_chains))
        normalize("seed", check_int("seed", self.seed))
        warmup = self.warmup_policy
        if warmup != "auto":
            if isinstance(warmup, str) or as_int(warmup) is None:
                raise ValueError(f"Expected `warmup` to be 'auto' or a non-negative int, got {warmup!r}.")
            normalize("warmup", check_nonneg_int("warmup", warmup))
        check_choice("mode", self.mode, MODES)
        check_bool("measure_discretization", self.measure_discretization)
        normalize("measure_every", check_positive_int("measure_every", self.measure_every))
        check_choice("gradient", self.gradient, GRADIENT_OPTIONS)
        check_compile(self.compile)
        check_bool("probe_kernel", self.probe_kernel)
        check_probe_loss_fn(self.probe_loss_fn)
        confidence = check_positive_float("confidence", self.confidence)
        if confidence >= 1:
            raise ValueError(f"Expected `confidence` to be a float in (0, 1), got {confidence!r}.")
        normalize("group_budget", check_cadence_option("group_budget", self.group_budget, 1))
        if self.max_offset_norm is not None:
            check_positive_float("max_offset_norm", self.max_offset_norm)
        check_positive_float("process_noise", self.process_noise)
        check_positive_float("jump_threshold", self.jump_threshold)

    def cadence(self) -> Cadence:
        """The schedule: ``every_n_steps``, ``window`` and the warm-up's bounds, ``"auto"`` values
        sized to ``total_steps`` (:func:`online_llc.monitor.cadence.auto_cadence`)."""
        return auto_cadence(self.total_steps, every_n_steps=self.every_n_steps, window=self.window, warmup=self.warmup_policy)

    def sgld_config(self) -> SGLDConfig:
        """The sampler's hyperparameters, with the defaults that depend on ``num_samples`` filled in
        (``gradient="auto"`` starts plain and is decided at the first shadow step)."""
        config = self._resolve(self.num_samples)
        return replace(config, gradient="control_variate") if self.gradient == "control_variate" else config

    def _resolve(self, num_samples: int) -> SGLDConfig:
        return resolve_hyperparameters(
            num_samples=num_samples,
            nbeta=self.nbeta,
            localization=self.localization,
            step_size=self.step_size,
            sampler=self.sampler,
            friction=self.friction,
            online=True,
        )

    @property
    def compile_mode(self) -> Optional[str]:
        """``compile`` as a ``torch.compile`` mode, or ``None`` when off."""
        return check_compile(self.compile)

    @property
    def warmup_policy(self) -> Union[int, str]:
        """``warmup`` with ``None`` read as the default (``"auto"``)."""
        return DEFAULT_WARMUP if self.warmup is None else self.warmup

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """Every option's name, in the order of the fields."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def reject_unknown(cls, where: str, options: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` naming every key of ``options`` that is not an option (``where``:
        the call to blame, e.g. ``"OnlineLLC()"``)."""
        known = cls.names()
        reject_unknown(where, {k: v for k, v in options.items() if k not in known})


def check_saved_settings(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """Raise unless a checkpoint's resolved settings ``saved`` are this monitor's ``mine`` (floats
    to rounding; ``total_steps`` is not compared: the resolved cadence is).

    Raises:
        ValueError: naming the first setting that differs.
    """
    for k, v in saved.items():
        if k == "total_steps":
            continue
        if k not in mine or (mine[k] != v and not (isinstance(v, float) and math.isclose(v, mine[k]))):
            raise ValueError(f"Expected the state's `{k}` to be {mine.get(k)!r} like this monitor's, got {v!r}.")
