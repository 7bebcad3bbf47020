"""The offline reference estimator: C independent SGLD chains of D draws at fixed weights ``w*``.

It stands beside the online flow (training loop -> ShadowSampler (sgld kernel) -> WindowStats ->
LLCFilter -> OnlineLLC records -> callbacks), not in it: it runs the same kernel as the online
monitor (:func:`online_llc.sgld.sampler_step`) and summarizes the draws with the same statistics
(:func:`online_llc.stats.summarize`), so online and offline estimates differ only in where the
centre sits and how the draws are aggregated. The step-size pilot (:mod:`online_llc.tuning`) and
the tests use it as the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_BURN_IN, DEFAULT_LOCALIZATION, DEFAULT_NUM_DRAWS, resolve_hyperparameters
from .errors import NonFiniteDrawError, check_nonneg_int, check_positive_int, reject_unknown
from .groups import resolve_groups
from .evaluator import LossEvaluator, LossFn, cuda_devices
from .sgld import init_aux, sampler_step
from .stats import summarize

__all__ = ["LLCResult", "estimate_llc"]


@dataclass(frozen=True)
class LLCResult:
    """The result of :func:`estimate_llc`.

    Attributes:
        mean: the LLC estimate, the mean of all draws after burn-in.
        std: its standard error, from the chains' effective sample sizes (autocorrelation-aware).
        per_chain: per-chain means, shape ``[C]``.
        per_chain_std: per-chain standard errors, shape ``[C]``.
        draws: the draws after burn-in, shape ``[C, D]``.
        noise_vars: their within-batch noise variances, shape ``[C, D]``.
        burn_in_draws: the discarded draws, shape ``[C, burn_in]``.
        var_channel: ``var(d) - mean(v)``: the draws' variance with batch noise removed.
        ratio: ``mean^2 / var_channel``, a temperature-free LLC estimate (NaN if undefined).
        effective_temperature: ``var_channel / mean``: about 1 for a well-tuned chain, well
            above 1 when the step size or gradient noise heats the chain (NaN if undefined).
        ess: total effective sample size of the draws.
        init_loss: mean loss at ``w*`` over the batches the chains visited.
        nbeta, localization, step_size: the hyperparameters used (``nbeta`` resolved).
        sampler: the sampler used.
        num_samples, num_chains, num_draws, burn_in, seed: the settings used.
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
    effective_temperature: float
    ess: float
    init_loss: float
    nbeta: float
    localization: float
    step_size: float
    sampler: str
    num_samples: int
    num_chains: int
    num_draws: int
    burn_in: int
    seed: int
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values (arrays as nested lists), e.g. for JSON."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, np.ndarray):
                out[k] = v.tolist()
        return out

    def __repr__(self) -> str:
        return (
            f"LLCResult(mean={self.mean:.4g}, std={self.std:.3g}, effective_temperature="
            f"{self.effective_temperature:.3g}, chains={self.num_chains}, draws={self.num_draws}, "
            f"nbeta={self.nbeta:.4g}, localization={self.localization:g}, step_size={self.step_size:.3g})"
        )


def _batches_forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Cycle through a re-iterable (a DataLoader reshuffles on each pass)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("Expected `batches` to yield at least one batch, got an empty iterable.")


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    num_samples: int,
    nbeta: Optional[float] = None,
    localization: float = DEFAULT_LOCALIZATION,
    step_size: Optional[float] = None,
    num_chains: int = 4,
    num_draws: int = DEFAULT_NUM_DRAWS,
    burn_in: int = DEFAULT_BURN_IN,
    seed: int = 0,
    sampler: str = "sgld",
    friction: float = 0.1,
    params: Optional[Sequence[Any]] = None,
    **kwargs: Any,
) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current weights ``w*``.

    Runs ``num_chains`` chains of localized, tempered SGLD (one after another), each for
    ``burn_in + num_draws`` steps from ``w*``, and averages the paired draws
    ``d = nbeta * mean_i(l_i(w) - l_i(w*))`` after burn-in::

        lambda_hat = nbeta * ( E_{w ~ p}[L_n(w)] - L_n(w*) ),
        p(w) ∝ exp( -nbeta * L_n(w) - (localization / 2) * ||w - w*||^2 ).

    The model's weights, buffers, ``.grad`` fields and the global RNG streams are unchanged
    afterwards (the global CPU/CUDA generators are forked and seeded from ``seed``, so a shuffling
    DataLoader without its own generator is reproducible too).

    Args:
        model: the network; its trainable parameters are sampled.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses (the per-sample negative
            log likelihood for the estimate to match theory).
        batches: any re-iterable of batches (a DataLoader), cycled as needed.
        num_samples: ``n``, the number of training samples the loss is an average over.
        nbeta: ``n * beta``; ``None`` means ``n / log n``.
        localization: ``gamma``, the pull towards ``w*``. See :mod:`online_llc.config`.
        step_size: the sampler's ``epsilon``; ``None`` means its default
            (:func:`online_llc.config.resolve_hyperparameters`: ``0.15 / nbeta`` for SGLD).
            See :mod:`online_llc.config` for how the defaults were measured.
        num_chains: independent chains ``C``.
        num_draws: draws per chain kept after burn-in ``D``.
        burn_in: steps per chain discarded first.
        seed: seeds the chains' private generators (chain ``c`` uses ``seed * 1000003 + c``).
        sampler: ``"sgld"`` (default), ``"rmsprop_sgld"`` or ``"sghmc"``; see
            :class:`online_llc.sgld.SGLDConfig`.
        friction: SGHMC's friction ``alpha`` in (0, 1] (1 is SGLD).
        params: sample only these parameters (parameter-name patterns, modules or parameters, as
            in :mod:`online_llc.groups`), the rest held at ``w*``: the weight-refined LLC of that
            group (Wang et al. 2024). ``None``: all trainable parameters.

    Returns:
        An :class:`LLCResult` with the estimate, its standard error, the draws and diagnostics.

    Raises:
        ValueError: an argument is out of range (the message names it), or ``loss_fn`` does not
            return per-sample losses of shape ``[B]``.
        TypeError: an unknown keyword argument.
        NonFiniteDrawError: a chain produced a non-finite loss (it diverged); the message says
            which chain and draw.

    Example:
        >>> from online_llc import estimate_llc
        >>> from online_llc.toy import deep_linear_problem
        >>> p = deep_linear_problem([4, 2], r=2, seed=0)   # regular: lambda = 4, n = 10240
        >>> res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples,
        ...                    num_chains=2, num_draws=200, burn_in=100)
        >>> abs(res.mean - p.lam) < 0.3 * p.lam
        True
    """
    reject_unknown("estimate_llc()", kwargs)
    check_positive_int("num_chains", num_chains)
    check_positive_int("num_draws", num_draws)
    check_nonneg_int("burn_in", burn_in)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Expected `seed` to be an int, got {seed!r}.")
    config = resolve_hyperparameters(
        num_samples=num_samples,
        nbeta=nbeta,
        localization=localization,
        step_size=step_size,
        sampler=sampler,
        friction=friction,
    )
    names = None if params is None else resolve_groups(model, {"params": list(params)})["params"]
    evaluator = LossEvaluator(model, loss_fn, param_names=names)
    center = {n: t.clone() for n, t in evaluator.center().items()}
    device = next(iter(center.values())).device
    devices = cuda_devices(center)

    total = burn_in + num_draws
    draws = np.empty((num_chains, total))
    noise = np.empty((num_chains, total))
    center_loss_sum, center_loss_count = 0.0, 0
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        stream = _batches_forever(batches)
        for c in range(num_chains):
            gen = torch.Generator(device=device).manual_seed(seed * 1000003 + c)
            offset = evaluator.zeros_like_center()
            aux = init_aux(config, offset)
            for s in range(total):
                offset, aux, info = sampler_step(
                    evaluator, center, offset, aux, next(stream), config=config, generator=gen
                )
                if not info.finite:
                    raise NonFiniteDrawError(c, s, f"draw={info.draw}, loss at w*+xi={info.loss_sample}")
                draws[c, s] = info.draw
                noise[c, s] = info.noise_var
                center_loss_sum += info.loss_center
                center_loss_count += 1

    kept, kept_noise = draws[:, burn_in:], noise[:, burn_in:]
    summary = summarize(kept, kept_noise)
    per_chain_std = np.array([summarize(kept[c : c + 1], kept_noise[c : c + 1]).se for c in range(num_chains)])
    return LLCResult(
        mean=float(summary.mean),
        std=float(summary.se),
        per_chain=kept.mean(axis=1),
        per_chain_std=per_chain_std,
        draws=kept.copy(),
        noise_vars=kept_noise.copy(),
        burn_in_draws=draws[:, :burn_in].copy(),
        var_channel=float(summary.var_channel),
        ratio=float(summary.ratio),
        effective_temperature=float(summary.consistency),
        ess=float(summary.ess),
        init_loss=center_loss_sum / max(center_loss_count, 1),
        nbeta=config.nbeta,
        localization=config.localization,
        step_size=config.step_size,
        sampler=config.sampler,
        num_samples=num_samples,
        num_chains=num_chains,
        num_draws=num_draws,
        burn_in=burn_in,
        seed=seed,
    )
