"""The monitor's public records: what :class:`online_llc.OnlineLLC` hands back.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> **records** -> callbacks.
Each closed window becomes an :class:`LLCEstimate`; the retrospective curve is a list of
:class:`SmoothedPoint`, stage boundaries are :class:`Transition` records and the chains' health
is a :class:`ChainHealth`; the offline estimator's result is an :class:`LLCResult`. Records are frozen values: string keys appear only at the logging edge
(:meth:`LLCEstimate.to_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "ChainHealth", "FILTERED_STATUSES", "LLCEstimate", "LLCResult", "ProbeResult", "STATUSES", "SmoothedPoint", "Transition",
]

#: Every status an estimate can have, in the order of their numeric codes (used by loggers).
STATUSES = ("warming_up", "tracking", "transition", "not_at_minimum", "diverged")
#: The statuses of windows the filter absorbed: their ``mean`` is the filtered LLC. A
#: ``warming_up`` or ``diverged`` window's ``mean`` is only its raw window mean, and loggers must
#: not report it as the LLC.
FILTERED_STATUSES = ("tracking", "transition", "not_at_minimum")


@dataclass(frozen=True)
class LLCEstimate:
    """The running LLC estimate after a window closed.

    Attributes:
        step: training step of the window's last draw.
        mean: filtered LLC (the raw window mean while ``warming_up`` or ``diverged``).
        std: its standard deviation: the filter's, widened while the level moves by how far a
            co-moving chain can trail it (:func:`online_llc.monitor.policy.lag_std`).
        lower: lower end of the band (``confidence`` level, default 90%).
        upper: upper end of the band.
        status: one of :data:`STATUSES`.
        raw_mean: the window's mean draw.
        raw_se: its autocorrelation-aware standard error.
        slope: filtered change of the LLC per training step.
        var_channel: ``var(d) - mean(v)`` of the window (batch noise removed).
        ratio: ``raw_mean^2 / var_channel``, a temperature-free LLC estimate (NaN if undefined).
        dispersion: ``var_channel / raw_mean``, the draws' variance over their mean (a secondary
            diagnostic; its healthy baseline depends on the model).
        heat: the window's minibatch temperature ``raw_mean / (raw_mean - heat_bias)``
            (:mod:`online_llc.calibration.heat`; ``inf`` when ``0 < raw_mean <= heat_bias``, hotter than the
            window can measure; NaN when ``raw_mean <= 0``): 1 when the chain's
            gradient noise adds nothing, 1.2 when it raises the estimate by 20%.
        heat_bias: how much the gradient noise raised ``raw_mean``, measured from half-batch
            gradients.
        step_size: the sampler's step during this window (calibrated on the heat unless given).
        discretization_bias: how much the step's finite size raised ``raw_mean``, measured from
            the chains' consecutive updates (:mod:`online_llc.calibration.heat`; noisy in one window, so the
            step is cooled on it pooled over windows); NaN where not measured. The window's total
            heat is ``raw_mean / (raw_mean - heat_bias - discretization_bias)``.
        ess: effective sample size of the window.
        nis: normalized innovation squared of the filter update (NaN when not fed).
        window_start: training step of the window's first draw.
        shadow_steps: shadow steps run so far.
        divergences: chain resets so far.
    """

    step: int
    mean: float
    std: float
    lower: float
    upper: float
    status: str
    raw_mean: float
    raw_se: float
    slope: float
    var_channel: float
    ratio: float
    dispersion: float
    ess: float
    nis: float
    window_start: int
    shadow_steps: int
    divergences: int
    heat: float = math.nan
    heat_bias: float = math.nan
    step_size: float = math.nan
    discretization_bias: float = math.nan

    @property
    def filtered(self) -> bool:
        """Whether the filter absorbed this window (``status`` in :data:`FILTERED_STATUSES`), so
        ``mean`` is the filtered LLC rather than a raw warm-up or diverged window mean."""
        return self.status in FILTERED_STATUSES

    @property
    def status_code(self) -> int:
        """``STATUSES.index(status)``: a number for loggers that only take floats."""
        return STATUSES.index(self.status)

    @property
    def total_bias(self) -> float:
        """``heat_bias + discretization_bias``, an unmeasured discretization bias counted as 0:
        how much the sampler's heat raised ``raw_mean`` (NaN without a heat measurement)."""
        disc = self.discretization_bias
        return self.heat_bias + (disc if math.isfinite(disc) else 0.0)

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values."""
        return asdict(self)


@dataclass(frozen=True)
class SmoothedPoint:
    """One point of the retrospective (RTS-smoothed) LLC curve: uses all windows, later ones too.

    Attributes:
        step: training step of the window.
        mean, std: smoothed LLC and its standard deviation.
        lower, upper: the band at the monitor's ``confidence``.
        slope: smoothed change of the LLC per training step.
    """

    step: int
    mean: float
    std: float
    lower: float
    upper: float
    slope: float


@dataclass(frozen=True)
class ChainHealth:
    """The shadow chains' health (see :meth:`OnlineLLC.health`).

    Attributes:
        divergences: chain resets (non-finite draw or runaway offset) so far.
        weight_jumps: jumps of the training weights detected so far (each restarts the warm-up).
        warmup_lengths: shadow steps each completed data-driven warm-up took.
        heat: the sampler's temperature over the last ``HEALTH_WINDOWS`` tracking windows whose
            band lies above zero, minibatch and discretization together,
            ``sum(raw_mean) / sum(raw_mean - heat_bias - discretization_bias)`` (an unmeasured
            discretization bias counts as 0; NaN if no window; inf when the biases take the whole
            estimate).
        relaxation_steps: shadow steps over which the slowest, localization-bound direction
            relaxes at the current step size, ``2 / (step_size * localization)``.
        alarms: what is wrong and what to do, one line per problem (``"<kind>: <details>"``);
            empty when healthy.
        short_run: whether the run (of known length) is shorter than three relaxation times of
            the chains: while the LLC moves, the live band is then mostly the chain's lag (the
            ``"a short run for these chains"`` alarm; the callbacks log it as ``llc/short_run``).
    """

    divergences: int
    weight_jumps: int
    warmup_lengths: List[int]
    heat: float
    alarms: List[str]
    relaxation_steps: float = math.nan
    short_run: bool = False

    @property
    def alarm(self) -> Optional[str]:
        """The alarms in one line, or ``None`` when healthy."""
        return "; ".join(self.alarms) if self.alarms else None


@dataclass(frozen=True)
class Transition:
    """A detected stage boundary: a run of consecutive ``transition`` windows.

    Attributes:
        start: first training step of the run's first window.
        end: last training step of the run's last window.
        level_before: smoothed LLC at the last filtered window before the run (NaN if none).
        level_after: smoothed LLC at the first filtered window after the run (the run's last
            window when none follows yet).
    """

    start: int
    end: int
    level_before: float
    level_after: float


@dataclass(frozen=True)
class ProbeResult:
    """What a probe set read from the chains' draws (:mod:`online_llc.stats.probes`): with
    ``delta_k = l_k(w* + xi) - l_k(w*)`` for its samples ``k`` and ``d`` the draw at the same
    ``xi``.

    Attributes:
        name: the probe set's name.
        llc: the observable-refined LLC ``nbeta * mean_k E[delta_k]``; ``llc_std`` its standard error.
        influence: ``-Cov(delta_k, d)`` per sample ``[K]`` (the Bayesian influence function on the
            training loss); ``influence_std`` the standard errors.
        correlation: ``Corr(delta_k, d)`` per sample ``[K]``, devinterp's convention (a Pearson
            correlation: no ``nbeta``, no minus sign); ``correlation_std`` the standard errors.
        susceptibility: ``-Cov(mean_k delta_k, d)``, the set's mean influence: with the chains
            moving one weight group (``estimate_llc(..., params=group)``), that component's
            susceptibility to the set; ``susceptibility_std`` its standard error.
        num_probes: ``K``.
        count: the draws the estimates average over (all chains).
        kernel: the loss kernel ``Cov(delta_k, delta_j)`` ``[K, K]`` (the probe-by-probe posterior
            covariance of the losses' changes), only when asked (``probe_kernel=True``), else None;
            ``kernel_std`` its standard errors.
        shape: the probes' shape: ``(K,)``, or with a per-token ``probe_loss_fn`` ``(samples, tokens)``
            (``influence.reshape(shape)`` gives them per sample and token).
    """

    name: str
    llc: float
    llc_std: float
    influence: np.ndarray
    influence_std: np.ndarray
    correlation: np.ndarray
    correlation_std: np.ndarray
    num_probes: int
    count: int
    susceptibility: float = math.nan
    susceptibility_std: float = math.nan
    kernel: Optional[np.ndarray] = None
    kernel_std: Optional[np.ndarray] = None
    shape: Tuple[int, ...] = ()

    #: The conventions :meth:`bif` knows.
    CONVENTIONS = ("online_llc", "devinterp")

    def bif(self, convention: str = "online_llc") -> Tuple[np.ndarray, np.ndarray]:
        """The Bayesian influence per probe sample and its standard errors in ``convention``:
        ``"online_llc"`` (``-Cov(delta_k, d)``, :attr:`influence`) or ``"devinterp"`` (devinterp's
        default, the Pearson correlation ``Corr(delta_k, d)``, :attr:`correlation`: no ``nbeta``,
        no minus sign), so that a value is compared with one of the same convention.

        Raises:
            ValueError: an unknown ``convention``.
        """
        if convention == "online_llc":
            return self.influence, self.influence_std
        if convention == "devinterp":
            return self.correlation, self.correlation_std
        raise ValueError(f"Expected `convention` to be one of {', '.join(map(repr, self.CONVENTIONS))}, got {convention!r}.")


@dataclass(frozen=True)
class LLCResult:
    """The result of :func:`estimate_llc`.

    Attributes:
        mean: the LLC estimate, the mean of all draws after burn-in.
        std: its standard error, autocorrelation-aware and counting the chains' disagreement
            (:func:`online_llc.stats.mcse.multichain_standard_error`): a run of few relaxation times
            reads its slow directions' correlation from the spread between chains.
        per_chain: per-chain means, shape ``[C]``.
        per_chain_std: per-chain standard errors, shape ``[C]``.
        draws: the draws after burn-in, shape ``[C, D]``.
        noise_vars: their within-batch noise variances, shape ``[C, D]``.
        burn_in_draws: the discarded draws, shape ``[C, burn_in]``.
        var_channel: ``var(d) - mean(v)``: the draws' variance with batch noise removed.
        ratio: ``mean^2 / var_channel``, a temperature-free LLC estimate (NaN if undefined).
        dispersion: ``var_channel / mean``, the draws' variance over their mean (1 for a Gamma
            draw at unit temperature; its baseline depends on the model and the window, so it is
            kept as a secondary diagnostic; ``heat`` measures the temperature).
        heat: the minibatch temperature ``mean / (mean - heat_bias)`` (:mod:`online_llc.calibration.heat`;
            NaN when ``mean <= heat_bias``): 1 when the gradient noise adds nothing.
        heat_bias: how much the gradient noise raised ``mean``, measured from half-batch
            gradients (an upper bound, tight for the directions that carry the draw).
        discretization_bias: how much the step's finite size raised ``mean``, measured to first
            order from consecutive updates (:func:`online_llc.calibration.heat.discretization_bias`; exact on
            a quadratic loss, high on stiff deep networks at small steps); NaN for SGHMC.
        total_heat: the temperature of the minibatch noise and the discretization together,
            ``mean / (mean - heat_bias - discretization_bias)``: exact on a quadratic loss to every
            order, because the measured discretization bias contains the product of the two heats
            (:mod:`online_llc.calibration.heat`). ``inf`` when the biases take the whole estimate (hotter than
            measurable); NaN when the estimate is not clearly positive.
        heat_interval: ``(low, high)``, two batch-means standard errors of the mean and of the
            biases either side; at gross heat the upper end is ``inf``.
        ess: total effective sample size of the draws.
        init_loss: mean loss at ``w*`` over the batches the chains visited.
        nbeta, localization, step_size: the estimand and the step actually used (``step_size``
            after calibration).
        sampler: the sampler used.
        gradient: the gradient the steps took, ``"plain"`` or ``"control_variate"``.
        draw: the draw recorded, ``"plain"`` or ``"control_variate"`` (:data:`online_llc.config.DRAWS`).
        batch_size: samples per batch (of the first batch).
        relaxation_steps: ``2 / (step_size * localization)``, the slowest direction's relaxation.
        calibration: ``(step_size, heat)`` of every calibration round (empty when ``step_size``
            was given), with ``heat`` counting the minibatch and the discretization bias
            together, ``mean / (mean - heat_bias - discretization_bias)``: the step is calibrated
            on their sum.
        num_samples, num_chains, num_draws, burn_in, seed: the settings used (``burn_in`` resolved).
        probes: each probe set's :class:`ProbeResult`, by name (empty without ``probes``).
    """

    mean: float
    std: float
    per_chain: np.ndarray
    per_chain_std: np.ndarray
    draws: np.ndarray
    noise_vars: np.ndarray
    burn_in_draws: np.ndarray
    var_channel: float
    ratio: float
    dispersion: float
    heat: float
    heat_bias: float
    ess: float
    init_loss: float
    nbeta: float
    localization: float
    step_size: float
    sampler: str
    batch_size: int
    relaxation_steps: float
    calibration: List[Tuple[float, float]]
    num_samples: int
    num_chains: int
    num_draws: int
    burn_in: int
    seed: int
    discretization_bias: float = math.nan
    total_heat: float = math.nan
    heat_interval: Tuple[float, float] = (math.nan, math.nan)
    gradient: str = "plain"
    draw: str = "plain"
    extra: Dict[str, Any] = field(default_factory=dict)
    probes: Dict[str, ProbeResult] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values (arrays as nested lists), e.g. for JSON."""
        def plain(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return v.tolist()
            return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v

        return plain(asdict(self))

    def __repr__(self) -> str:
        return (
            f"LLCResult(mean={self.mean:.4g}, std={self.std:.3g}, heat="
            f"{self.total_heat:.3g}, chains={self.num_chains}, draws={self.num_draws}, "
            f"nbeta={self.nbeta:.4g}, localization={self.localization:g}, step_size={self.step_size:.3g}, "
            f"gradient={self.gradient!r}, draw={self.draw!r})"
        )
