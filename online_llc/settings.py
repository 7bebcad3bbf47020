"""The online monitor's options, listed, defaulted and validated in one place.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. The options reach every stage of that flow: the chains (``num_samples``, ``nbeta``, ``localization``,
``step_size``, ``sampler``, ``friction``, ``num_chains``, ``seed``, ``max_offset_norm``), the
schedule and windows (``every_n_steps``, ``window``, ``warmup``, ``group_budget``) and the filter
(``process_noise``, ``jump_threshold``, ``confidence``). :class:`online_llc.OnlineLLC` and the
Lightning callback both take them as keyword arguments and hold them as one
:class:`MonitorSettings`, so a new option is added here once. How the defaults were chosen is
written in :mod:`online_llc.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Tuple, Union

from .config import DEFAULT_EVERY_N_STEPS, DEFAULT_WARMUP, DEFAULT_WINDOW, resolve_hyperparameters
from .errors import check_nonneg_int, check_positive_float, check_positive_int, reject_unknown
from .sgld import SGLDConfig

__all__ = ["MonitorSettings"]


@dataclass(frozen=True)
class MonitorSettings:
    """The options of the online monitor, validated on construction; values are kept as given.

    Attributes:
        num_samples: ``n``, the size of the training set; ``None`` while it is not known yet
            (the Lightning callback then reads it from the train dataloader).
        nbeta: ``n * beta``; ``None`` means ``min(n / log n, 256)``, as offline.
        localization: ``gamma``; ``None`` means ``0.09 * nbeta`` (stronger than offline's
            ``0.4 * sqrt(nbeta)``, so the co-moving chain relaxes within a few windows; see
            :mod:`online_llc.config`).
        step_size: the sampler's ``epsilon``; ``None``: ``min(0.15 / nbeta, 0.15 B / nbeta^2)``
            for the first batch's size ``B``, lowered when a window's measured minibatch heat
            exceeds 1.1 (:mod:`online_llc.heat`); a given step is used as it is.
        every_n_steps: training steps between shadow steps (>= 1).
        window: draws per chain per window (>= 2).
        num_chains: chains run at each shadow step.
        seed: seeds the chains' private generators.
        warmup: how long a chain warms up after the start, a reset or a jump of the training
            weights (its windows are reported as ``warming_up`` and kept out of the filter):
            ``"auto"`` (the default, ``None``) detects equilibrium from the chain's draws and
            offset norm (MSER-5, :mod:`online_llc.warmup`; at least
            :data:`online_llc.track.MIN_AUTO_WARMUP` (60 after a jump of the weights) and at most
            :data:`online_llc.track.MAX_AUTO_WARMUP` shadow steps); an int is a fixed number of
            shadow steps.
        confidence: coverage of the ``lower``/``upper`` band, in (0, 1).
        process_noise: see :class:`online_llc.filter.LLCFilter`.
        jump_threshold: see :class:`online_llc.filter.LLCFilter`.
        max_offset_norm: see :class:`online_llc.shadow.ShadowSampler`.
        sampler: ``"sgld"`` (default), ``"rmsprop_sgld"`` or ``"sghmc"`` (its momentum or
            moments are part of the chain state and checkpointed).
        friction: SGHMC's friction ``alpha`` in (0, 1].
        group_budget: group shadow steps per shadow step, spent round-robin over the groups:
            the overhead does not grow with the number of groups, each group is observed every
            ``len(groups) / group_budget`` shadow steps, and its band widens in between.

    Raises:
        ValueError: naming the first invalid option and what it accepts.
    """

    num_samples: Optional[int] = None
    nbeta: Optional[float] = None
    localization: Optional[float] = None
    step_size: Optional[float] = None
    every_n_steps: int = DEFAULT_EVERY_N_STEPS
    window: int = DEFAULT_WINDOW
    num_chains: int = 1
    seed: int = 0
    warmup: Union[int, str, None] = None
    confidence: float = 0.9
    process_noise: float = 0.1
    jump_threshold: float = 16.0
    max_offset_norm: Optional[float] = None
    sampler: str = "sgld"
    friction: float = 0.1
    group_budget: int = 1

    def __post_init__(self) -> None:
        # n and the sampler's knobs, checked by the same function and in the same order as when
        # the monitor resolves them; before n is known, n = 2 stands in (it only sets defaults).
        self._resolve(2 if self.num_samples is None else self.num_samples)
        check_positive_int("every_n_steps", self.every_n_steps)
        window = self.window
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"Expected `window` to be an int >= 2, got {window!r}.")
        check_positive_int("num_chains", self.num_chains)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Expected `seed` to be an int, got {self.seed!r}.")
        warmup = self.warmup_policy
        if warmup != "auto":
            if isinstance(warmup, str):
                raise ValueError(f"Expected `warmup` to be 'auto' or a non-negative int, got {warmup!r}.")
            check_nonneg_int("warmup", warmup)
        confidence = check_positive_float("confidence", self.confidence)
        if confidence >= 1:
            raise ValueError(f"Expected `confidence` to be a float in (0, 1), got {confidence!r}.")
        check_positive_int("group_budget", self.group_budget)
        if self.max_offset_norm is not None:
            check_positive_float("max_offset_norm", self.max_offset_norm)
        check_positive_float("process_noise", self.process_noise)
        check_positive_float("jump_threshold", self.jump_threshold)

    def sgld_config(self) -> SGLDConfig:
        """The sampler's hyperparameters, with the defaults that depend on ``num_samples`` filled in."""
        return self._resolve(self.num_samples)

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
