"""The result of :func:`online_llc.estimate_llc` from its chains' records: the estimate, its
standard error, the measured heat, and the warnings a user must see (a hot run, an imprecise one)."""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import numpy as np

from online_llc.calibration.heat import heat_interval, per_step_bias
from online_llc.calibration.step import MAX_EXCESS, relaxation_steps
from online_llc.config import SGLDConfig
from online_llc.offline.rows import DRAW, HEAT_BIAS, NOISE_VAR, OWN_DOT, PREV_DOT, stretch_discretization_bias
from online_llc.records import LLCResult
from online_llc.stats.draws import heat_ratio, summarize
from online_llc.stats.mcse import multichain_standard_error

__all__ = ["llc_result"]


def llc_result(
    rows: np.ndarray,
    burn_in: int,
    num_draws: int,
    *,
    config: SGLDConfig,
    step_given: bool,
    batch_size: int,
    precision: Optional[float],
    init_loss: float,
    calibration: List[Tuple[float, float]],
    num_samples: int,
    seed: int,
) -> LLCResult:
    """The :class:`LLCResult` of the chains' records ``rows`` ``[chains, ROWS, burn_in + num_draws]``.

    Warns (``RuntimeWarning``) when the measured heat is above ``1 + MAX_EXCESS`` and clearly above
    1, and when the standard error is above ``precision`` times the estimate (``precision``:
    None when the draws were given).
    """
    num_chains = rows.shape[0]
    draws = rows[:, DRAW]
    kept, kept_noise = draws[:, burn_in:], rows[:, NOISE_VAR, burn_in:]
    summary = summarize(kept, kept_noise)
    per_chain_std = np.array([summarize(kept[c : c + 1], kept_noise[c : c + 1]).se for c in range(num_chains)])
    heat_bias = float(rows[:, HEAT_BIAS, burn_in:].mean())
    heat = heat_ratio(float(summary.mean), heat_bias)
    per_chain_disc = [stretch_discretization_bias(chain[:, burn_in:]) for chain in rows]
    per_chain_disc = [b for b in per_chain_disc if math.isfinite(b)]
    disc_bias = float(np.mean(per_chain_disc)) if per_chain_disc else math.nan
    biases = np.stack([per_step_bias(c[PREV_DOT], c[OWN_DOT], c[HEAT_BIAS]) for c in rows[:, :, burn_in:]])
    total_heat, heat_low, heat_high = heat_interval(kept, biases)
    # Warn when the heat reads above the bound and is clearly above 1 (its lower end), so that pure
    # noise on a calibrated chain does not cry wolf; a given step gets the same check.
    if total_heat > 1 + MAX_EXCESS and heat_low > 1:
        total_bias = heat_bias + (disc_bias if math.isfinite(disc_bias) else 0.0)
        warnings.warn(
            f"estimate_llc: the chains ran hot{'' if step_given else ' after calibration'} (heat "
            f"{total_heat:.3g}, at least {heat_low:.3g}, at step_size {config.step_size:.3g}, batch {batch_size}); "
            f"the estimate is about {total_bias:.3g} too high ({heat_bias:.3g} from the minibatch noise, "
            f"{disc_bias:.3g} from the step's discretization). "
            + (
                "Use larger batches or pass a smaller step_size (and a longer burn_in)."
                if not step_given
                else "Leave step_size to the default calibration, or pass a smaller one (and a longer burn_in)."
            ),
            RuntimeWarning,
            stacklevel=3,
        )
    std = multichain_standard_error(kept)
    if precision is not None and std > precision * abs(float(summary.mean)):
        warnings.warn(
            f"estimate_llc: the standard error {std:.3g} is {std / abs(float(summary.mean)):.0%} of the estimate "
            f"{float(summary.mean):.3g} after {num_draws} draws per chain (the most chosen automatically); the "
            f"chains mix over about {relaxation_steps(config):.0f} steps. Pass a larger num_draws or num_chains.",
            RuntimeWarning,
            stacklevel=3,
        )
    return LLCResult(
        mean=float(summary.mean),
        std=std,
        per_chain=kept.mean(axis=1),
        per_chain_std=per_chain_std,
        draws=kept.copy(),
        noise_vars=kept_noise.copy(),
        burn_in_draws=draws[:, :burn_in].copy(),
        var_channel=float(summary.var_channel),
        ratio=float(summary.ratio),
        dispersion=float(summary.dispersion),
        heat=heat,
        heat_bias=heat_bias,
        discretization_bias=disc_bias,
        total_heat=total_heat,
        heat_interval=(heat_low, heat_high),
        ess=float(summary.ess),
        init_loss=init_loss,
        nbeta=config.nbeta,
        localization=config.localization,
        step_size=config.step_size,
        sampler=config.sampler,
        gradient=config.gradient,
        draw=config.draw,
        batch_size=batch_size,
        relaxation_steps=relaxation_steps(config),
        calibration=calibration,
        num_samples=num_samples,
        num_chains=num_chains,
        num_draws=num_draws,
        burn_in=burn_in,
        seed=seed,
    )
