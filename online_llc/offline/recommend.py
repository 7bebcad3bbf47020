"""The step-size pilot: short chains on a ladder of steps, and the step they recommend.

It stands before the online flow (training loop -> ShadowSampler (sgld kernel) -> WindowStats ->
LLCFilter -> OnlineLLC records -> callbacks): run :func:`recommend_step_size` on the user's model
and batches to choose the step the kernel will take
(:func:`online_llc.kernel.diagnostics.mala_acceptance` audits one proposal of that kernel).

Why a pilot: the default step is calibrated on the measured minibatch heat
(:mod:`online_llc.calibration.heat`), which sees the gradient noise but not the discretization error of the
step, ``1 / (1 - epsilon a / 4)`` along a direction of stiffness ``a``: larger than the 2% the
default allows when the curvature is well above 1. A Metropolis (MALA) acceptance computed on one
batch barely sees it (see :func:`~online_llc.kernel.diagnostics.mala_acceptance`). Step halving does: since the bias is about
linear in ``epsilon``, ``lambda(epsilon) - lambda(epsilon / 2)`` is about half of
``lambda(epsilon)``'s bias (Richardson). The pilot runs short chains on a geometric ladder of step
sizes around the batch-sized default and recommends the largest one that

* did not diverge,
* is not hot (measured minibatch heat below ``max_heat``), and
* agrees with the estimate at half its step within ``tolerance`` (relative) plus two standard
  errors.

The largest passing step mixes fastest, so it gives the most precise estimate per step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence

from torch import nn

from online_llc.calibration.step import MAX_EXCESS, resolve_hyperparameters
from online_llc.errors import NonFiniteDrawError, check_positive_float, check_positive_int, reject_unknown
from online_llc.kernel.evaluator import LossFn
from online_llc.kernel.halves import split_halves
from online_llc.offline.batches import is_one_shot
from online_llc.offline.estimate import estimate_llc

__all__ = [
    "PilotRun",
    "StepSizeRecommendation",
    "recommend_step_size",
]



@dataclass(frozen=True)
class PilotRun:
    """One rung of the pilot's step-size ladder.

    Attributes:
        step_size: the step tried.
        multiplier: ``step_size`` over the sampler's default.
        mean: the pilot's LLC estimate at that step (NaN if it diverged).
        std: its standard error.
        heat: the measured minibatch heat (NaN if undefined).
        diverged: whether a chain produced a non-finite loss.
        verdict: ``"ok"``, ``"diverged"``, ``"hot"``, ``"biased"`` (disagrees with half the step),
            or ``"unchecked"`` (no smaller healthy step to compare with).
        reason: the verdict in words.
    """

    step_size: float
    multiplier: float
    mean: float
    std: float
    heat: float
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
                f"{r.step_size:10.3g} {r.multiplier:9.3g} {r.mean:9.3f} {r.std:7.3f} {r.heat:6.3f}  "
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
    localization: Optional[float] = None,
    sampler: str = "sgld",
    friction: float = 0.1,
    multipliers: Sequence[float] = (4.0, 2.0, 1.0, 0.5, 0.25),
    num_chains: int = 4,
    num_draws: int = 600,
    burn_in: int = 200,
    tolerance: float = 0.1,
    max_heat: float = 1.0 + MAX_EXCESS,
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
        multipliers: the ladder, as multiples of the sampler's starting step for this batch size
            (:func:`online_llc.calibration.step.default_step_size`; distinct, > 0; each
            rung is compared with the next smaller one, so halving ladders suit the test).
        num_chains, num_draws, burn_in: the pilot's budget per rung.
        tolerance: relative disagreement with the next smaller step that counts as step-size
            bias (> 0).
        max_heat: measured minibatch heat above which a rung is called hot (> 1; default 1.05, the
            bound the calibration keeps the step under, stricter than the live alarm's 1.1).
        seed: seeds the pilot's chains.

    Returns:
        A :class:`StepSizeRecommendation`.
    """
    reject_unknown("recommend_step_size()", kwargs)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("Expected `batches` to yield at least one batch, got an empty iterable.")
    if is_one_shot(batches):
        # The peek consumed the first batch of a one-shot iterator: put it back. Every rung then
        # reads on from the same stream (an endless one never runs out).
        batches = itertools.chain([first], batches)
    parts = split_halves(first)
    default = resolve_hyperparameters(
        num_samples=num_samples, nbeta=nbeta, localization=localization, step_size=None, sampler=sampler,
        friction=friction, batch_size=None if parts is None else parts[2],
    ).step_size
    mults = sorted({check_positive_float("multipliers[i]", float(m)) for m in multipliers}, reverse=True)
    if len(mults) < 2:
        raise ValueError(f"Expected `multipliers` to hold at least two distinct values > 0, got {list(multipliers)!r}.")
    check_positive_int("num_chains", num_chains)
    check_positive_int("num_draws", num_draws)
    check_positive_int("burn_in", burn_in)
    tolerance = check_positive_float("tolerance", tolerance)
    max_heat = check_positive_float("max_heat", max_heat)
    if max_heat <= 1:
        raise ValueError(f"Expected `max_heat` to be a float > 1, got {max_heat!r}.")

    raw = []
    for m in mults:
        step = default * m
        try:
            # The ladder is of plain minibatch steps around the batch-sized default.
            res = estimate_llc(
                model, loss_fn, batches, num_samples=num_samples, nbeta=nbeta, localization=localization,
                step_size=step, sampler=sampler, friction=friction, num_chains=num_chains, num_draws=num_draws,
                burn_in=max(1, math.ceil(burn_in / m)), seed=seed, gradient="plain", progress=False,
            )
            raw.append((m, step, res.mean, res.std, res.heat, False))
        except NonFiniteDrawError:
            raw.append((m, step, math.nan, math.nan, math.nan, True))

    def is_hot(heat: float) -> bool:
        return math.isfinite(heat) and heat > max_heat

    runs: List[PilotRun] = []
    for i, (m, step, mean, std, temp, diverged) in enumerate(raw):
        if diverged:
            verdict, reason = "diverged", "a chain produced a non-finite loss"
        elif is_hot(temp):
            verdict, reason = "hot", f"minibatch heat {temp:.3f} > {max_heat:g}: the chain runs hot"
        else:
            smaller = next((r for r in raw[i + 1 :] if not r[5]), None)
            if smaller is None:
                verdict, reason = "unchecked", "no smaller healthy step to compare with"
            else:
                m2, _, mean2, std2, _, _ = smaller
                rel = (mean - mean2) / abs(mean2) if mean2 != 0 else math.inf
                allowed = tolerance * abs(mean2) + 2 * math.hypot(std, std2)
                if abs(mean - mean2) > allowed:
                    verdict = "biased"
                    reason = f"{rel:+.0%} against {m2:g}x default (allowed ±{allowed:.3g}): step-size bias"
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
