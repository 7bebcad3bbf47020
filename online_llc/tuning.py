"""Step-size diagnostics: a short pilot that recommends ``step_size``, and the MALA acceptance.

It stands before the online flow (training loop -> ShadowSampler (sgld kernel) -> WindowStats ->
LLCFilter -> OnlineLLC records -> callbacks): run :func:`recommend_step_size` on the user's model
and batches to choose the step the kernel will take; :func:`mala_acceptance` audits one proposal of
that kernel.

Why a pilot: the SGLD estimate is biased upwards as the step grows, mostly by the minibatch
gradient noise, whose injected variance per step grows like ``epsilon^2`` against the Langevin
noise's ``epsilon``, so the chain runs hotter than ``1 / nbeta`` by a factor of about
``1 + c epsilon``. A Metropolis (MALA) acceptance computed on one batch cannot see this (it stays
above 0.98 on the toy models while the estimate is 50% high; see
:func:`mala_acceptance`), and the window's consistency ``var / mean`` (about the
temperature) has a model-dependent baseline (0.7 on a localized linear regression, 2.3 on a deep
linear network at a good step). What does reveal the bias is step halving: since the bias is
about linear in ``epsilon``, ``lambda(epsilon) - lambda(epsilon / 2)`` is about half of
``lambda(epsilon)``'s bias (Richardson). The pilot runs short chains on a geometric ladder of
step sizes and recommends the largest one that

* did not diverge,
* is not grossly hot (consistency below ``max_temperature``), and
* above the default step, agrees with the estimate at half its step within ``tolerance``
  (relative) plus two standard errors.

Halving is not applied at or below the default when a rung at or above the default is healthy:
there the step's small heat is wanted, since it offsets the downward pull of the localization
(:mod:`online_llc.config`; on the toy models the small-step limit at ``gamma = 100`` lies 15-45%
below the learning coefficient). The pilot is a guard against steps that are too large (a user's
choice, or a model whose gradient noise makes the default hot, when every rung is checked), not a
search for the smallest step. The largest passing step mixes fastest,
so it gives the most precise live estimate per shadow step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import DEFAULT_LOCALIZATION, resolve_hyperparameters
from .errors import check_positive_float, check_positive_int, reject_unknown
from .evaluator import LossEvaluator, LossFn, private_rng
from .offline import NonFiniteDrawError, estimate_llc
from .sgld import SGLDConfig

__all__ = [
    "PilotRun",
    "StepSizeRecommendation",
    "recommend_step_size",
    "DEFAULT_MAX_TEMPERATURE",
    "mala_acceptance",
]

#: Consistency (``var / mean`` of the draws, about the chain's temperature) above which a step is
#: called hot. Healthy chains on the toy models read 0.7-2.3, depending on model and localization;
#: every step that read above 2.5 there over-estimated by 40% or more.
DEFAULT_MAX_TEMPERATURE = 2.5


@dataclass(frozen=True)
class PilotRun:
    """One rung of the pilot's step-size ladder.

    Attributes:
        step_size: the step tried.
        multiplier: ``step_size`` over the sampler's default.
        mean: the pilot's LLC estimate at that step (NaN if it diverged).
        std: its standard error.
        temperature: the draws' consistency ``var / mean`` (NaN if undefined).
        diverged: whether a chain produced a non-finite loss.
        verdict: ``"ok"``, ``"diverged"``, ``"hot"``, ``"biased"`` (disagrees with half the step),
            or ``"unchecked"`` (no smaller healthy step to compare with).
        reason: the verdict in words.
    """

    step_size: float
    multiplier: float
    mean: float
    std: float
    temperature: float
    diverged: bool
    verdict: str
    reason: str


@dataclass(frozen=True)
class StepSizeRecommendation:
    """The pilot's result; ``str()`` gives a table and the reasons.

    Attributes:
        step_size: the recommended step (pass it as ``step_size=`` to :class:`~online_llc.OnlineLLC`
            or :func:`~online_llc.estimate_llc`).
        default_step_size: the sampler's default for this model.
        runs: every rung, largest step first.
        reason: why this step was chosen.
        ok: False when no rung passed the checks (the smallest healthy rung is then returned and
            ``reason`` says what to try).
    """

    step_size: float
    default_step_size: float
    runs: List[PilotRun] = field(default_factory=list)
    reason: str = ""
    ok: bool = True

    def __str__(self) -> str:
        lines = [f"{'step':>10s} {'x default':>9s} {'LLC':>9s} {'± se':>7s} {'T':>6s}  verdict"]
        for r in self.runs:
            lines.append(
                f"{r.step_size:10.3g} {r.multiplier:9.3g} {r.mean:9.3f} {r.std:7.3f} {r.temperature:6.2f}  "
                f"{r.verdict}: {r.reason}"
            )
        lines.append(f"recommended step_size = {self.step_size:.4g}: {self.reason}")
        return "\n".join(lines)


def recommend_step_size(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    num_samples: int,
    nbeta: Optional[float] = None,
    localization: float = DEFAULT_LOCALIZATION,
    sampler: str = "sgld",
    friction: float = 0.1,
    multipliers: Sequence[float] = (4.0, 2.0, 1.0, 0.5, 0.25),
    num_chains: int = 4,
    num_draws: int = 600,
    burn_in: int = 200,
    tolerance: float = 0.1,
    max_temperature: float = DEFAULT_MAX_TEMPERATURE,
    seed: int = 0,
    **kwargs: Any,
) -> StepSizeRecommendation:
    """Run a short pilot at the model's current weights and recommend a step size.

    Each rung runs :func:`~online_llc.estimate_llc` with ``num_chains`` chains of ``num_draws``
    draws after a burn-in of ``burn_in / multiplier`` steps (a smaller step relaxes more slowly),
    so the pilot costs about ``len(multipliers) * num_chains * (num_draws + burn_in / m)``
    gradient evaluations (about 20000 at the defaults: 20-30 s on the toy models on one core). See the module docstring for the rules.

    Args:
        model, loss_fn, batches, num_samples, nbeta, localization, sampler, friction: as for
            :func:`~online_llc.estimate_llc`; use the settings the monitor will run with.
        multipliers: the ladder, as multiples of the sampler's default step (distinct, > 0; each
            rung is compared with the next smaller one, so halving ladders suit the test).
        num_chains, num_draws, burn_in: the pilot's budget per rung.
        tolerance: relative disagreement with the next smaller step that counts as step-size
            bias (> 0).
        max_temperature: consistency above which a rung is called hot (> 0).
        seed: seeds the pilot's chains.

    Returns:
        A :class:`StepSizeRecommendation`.
    """
    reject_unknown("recommend_step_size()", kwargs)
    default = resolve_hyperparameters(
        num_samples=num_samples, nbeta=nbeta, localization=localization, step_size=None, sampler=sampler,
        friction=friction,
    ).step_size
    mults = sorted({check_positive_float("multipliers[i]", float(m)) for m in multipliers}, reverse=True)
    if len(mults) < 2:
        raise ValueError(f"Expected `multipliers` to hold at least two distinct values > 0, got {list(multipliers)!r}.")
    check_positive_int("num_chains", num_chains)
    check_positive_int("num_draws", num_draws)
    check_positive_int("burn_in", burn_in)
    tolerance = check_positive_float("tolerance", tolerance)
    max_temperature = check_positive_float("max_temperature", max_temperature)

    raw = []
    for m in mults:
        step = default * m
        try:
            res = estimate_llc(
                model, loss_fn, batches, num_samples=num_samples, nbeta=nbeta, localization=localization,
                step_size=step, sampler=sampler, friction=friction, num_chains=num_chains, num_draws=num_draws,
                burn_in=max(1, math.ceil(burn_in / m)), seed=seed,
            )
            raw.append((m, step, res.mean, res.std, res.effective_temperature, False))
        except NonFiniteDrawError:
            raw.append((m, step, math.nan, math.nan, math.nan, True))

    def is_hot(temp: float) -> bool:
        return math.isfinite(temp) and temp > max_temperature

    # The default's small heat is wanted only where the default region is verifiably healthy: a
    # rung at or above it that did not diverge and whose consistency is positive and not hot (a
    # negative one means batch noise swamps the draws' variance, and then heat cannot be judged).
    exempt = any(m >= 1 and not d and math.isfinite(t) and 0 < t <= max_temperature for m, _, _, _, t, d in raw)
    runs: List[PilotRun] = []
    for i, (m, step, mean, std, temp, diverged) in enumerate(raw):
        if diverged:
            verdict, reason = "diverged", "a chain produced a non-finite loss"
        elif is_hot(temp):
            verdict, reason = "hot", f"consistency {temp:.2f} > {max_temperature:g}: the chain runs hot"
        else:
            smaller = next((r for r in raw[i + 1 :] if not r[5]), None)
            if smaller is None:
                verdict, reason = "unchecked", "no smaller healthy step to compare with"
            else:
                m2, _, mean2, std2, _, _ = smaller
                rel = (mean - mean2) / abs(mean2) if mean2 != 0 else math.inf
                allowed = tolerance * abs(mean2) + 2 * math.hypot(std, std2)
                if abs(mean - mean2) > allowed and (m > 1 or not exempt):
                    verdict = "biased"
                    reason = f"{rel:+.0%} against {m2:g}x default (allowed ±{allowed:.3g}): step-size bias"
                elif abs(mean - mean2) > allowed:
                    # At or below the default the step's heat is wanted: it offsets the
                    # localization's downward pull (online_llc.config), so halving it moves the
                    # estimate away from the model's learning coefficient, not towards it.
                    verdict = "ok"
                    reason = (f"{rel:+.0%} against {m2:g}x default, expected at or below the default step "
                              "(its heat offsets the localization's pull)")
                else:
                    verdict = "ok"
                    reason = f"agrees with {m2:g}x default ({rel:+.0%}, allowed ±{allowed:.3g})"
        runs.append(PilotRun(step, m, mean, std, temp, diverged, verdict, reason))

    chosen = next((r for r in runs if r.verdict == "ok"), None)
    if chosen is not None:
        return StepSizeRecommendation(
            chosen.step_size, default, runs,
            f"the largest step that is stable, not hot and agrees with half of it ({chosen.multiplier:g}x default)",
        )
    healthy = [r for r in runs if r.verdict in ("unchecked", "biased") and not r.diverged]
    fallback = healthy[-1] if healthy else runs[-1]
    return StepSizeRecommendation(
        fallback.step_size, default, runs,
        "no rung passed; this is the smallest healthy one: try smaller multipliers or a longer pilot",
        ok=False,
    )


def mala_acceptance(
    evaluator: LossEvaluator,
    center: Mapping[str, Tensor],
    offset: Mapping[str, Tensor],
    batch: Any,
    *,
    config: SGLDConfig,
    generator: torch.Generator,
    masks: Optional[Mapping[str, Tensor]] = None,
) -> float:
    """Metropolis-adjusted acceptance probability of one SGLD proposal from ``offset`` (a step-size
    diagnostic; the chain itself is not moved and never rejects).

    With the potential ``U(xi) = nbeta L_B(w* + xi) + (gamma / 2) ||xi||^2`` on one batch, SGLD
    proposes ``xi' ~ q(. | xi) = N(xi - (eps / 2) grad U(xi), eps I)``; MALA (Roberts and Tweedie
    1996) would accept it with probability::

        alpha = min(1, exp( U(xi) - U(xi') + log q(xi | xi') - log q(xi' | xi) )).

    ``alpha`` is 1 for an exact sampler and falls as the discretization error grows: devinterp's
    authors report mean acceptances about 0.9 for well-tuned LLC chains. Both potentials use the
    same batch (and the same dropout masks), so batch noise does not enter. Costs two forward and
    backward passes; ``generator`` draws the proposal (pass one that is not the chain's, so the
    audit does not change its trajectory).

    Returns:
        ``alpha`` in [0, 1], or NaN if a loss is not finite.
    """
    eps, nbeta, gamma = config.step_size, config.nbeta, config.localization
    noise_std = math.sqrt(eps) * config.noise_scale
    if noise_std == 0:
        return math.nan  # deterministic dynamics: no proposal density

    def potential(xi: Mapping[str, Tensor]) -> Tuple[float, List[Tensor]]:
        rewind()
        leaf = {n: t.detach().requires_grad_(True) for n, t in xi.items()}
        loss = evaluator.losses({n: center[n] + leaf[n] for n in leaf}, batch).mean()
        grads = torch.autograd.grad(loss, list(leaf.values()), allow_unused=True)
        with torch.no_grad():
            u = nbeta * float(loss.detach().double()) + 0.5 * gamma * sum(
                float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2 for t in xi.values()
            )
            full = []
            for (name, x), g in zip(xi.items(), grads):
                d = x.detach() * gamma
                if g is not None:
                    d = d + nbeta * g
                mask = masks.get(name) if masks else None
                full.append(d * mask if mask is not None else d)
        return u, full

    with private_rng(center, generator) as rewind, torch.enable_grad():
        u0, g0 = potential(offset)
        with torch.no_grad():
            prop: Dict[str, Tensor] = {}
            for (name, x), g in zip(offset.items(), g0):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                mask = masks.get(name) if masks else None
                if mask is not None:
                    z = z * mask
                prop[name] = x - (eps / 2) * g + noise_std * z
        u1, g1 = potential(prop)
    if not (math.isfinite(u0) and math.isfinite(u1)):
        return math.nan
    with torch.no_grad():
        fwd = bwd = 0.0  # ||xi' - xi + (eps/2) grad U(xi)||^2 and the reverse
        for (name, x), ga, gb in zip(offset.items(), g0, g1):
            xp = prop[name]
            fwd += float(torch.linalg.vector_norm((xp - x + (eps / 2) * ga).double())) ** 2
            bwd += float(torch.linalg.vector_norm((x - xp + (eps / 2) * gb).double())) ** 2
    var = noise_std**2
    log_alpha = u0 - u1 + (fwd - bwd) / (2 * var)
    return 1.0 if log_alpha >= 0 else math.exp(log_alpha)
