"""The offline reference estimator: C independent SGLD chains of D draws at fixed weights ``w*``.

It stands beside the online flow (training loop -> ShadowSampler (sgld kernel) -> WindowStats ->
LLCFilter -> OnlineLLC records -> callbacks), not in it: it runs the same kernel as the online
monitor (:func:`online_llc.kernel.step.sampler_step`) and summarizes the draws with the same statistics
(:func:`online_llc.stats.draws.summarize`), so online and offline estimates differ only in where the
centre sits and how the draws are aggregated. The step-size pilot (:mod:`online_llc.offline.recommend`) and
the tests use it as the reference.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from online_llc.calibration.budget import (
    DEFAULT_PRECISION,
    next_burn_in,
    resolve_burn_in,
    resolve_num_draws,
    scaled_cap,
)
from online_llc.calibration.step import (
    max_step_size,
    resolve_hyperparameters,
    control_variate_pays,
)
from online_llc.errors import (
    check_bool,
    check_choice,
    check_int,
    check_nonneg_int,
    check_positive_int,
    reject_unknown,
)
from online_llc.kernel.anchor import full_gradient
from online_llc.kernel.evaluator import MODES, LossEvaluator, LossFn
from online_llc.kernel.probes import require_probes
from online_llc.kernel.randomness import cuda_devices
from online_llc.models.groups import resolve_groups
from online_llc.offline.batches import batch_size_of, batches_forever, is_one_shot
from online_llc.offline.chains import Chains
from online_llc.offline.probes import ProbeSets
from online_llc.offline.rows import (
    OFFSET_SQ,
    imprecise,
    recalibrated,
)
from online_llc.offline.summary import llc_result
from online_llc.records import LLCResult

__all__ = ["LLCResult", "estimate_llc", "CAP_BATCH", "MAX_AUTO_BURN_IN", "MAX_AUTO_DRAWS", "CALIBRATION_STEPS", "MAX_CALIBRATION_ROUNDS"]

#: The longest automatic burn-in, in steps per chain of batches of :data:`CAP_BATCH` samples (a
#: batch of ``B < CAP_BATCH`` gets ``CAP_BATCH / B`` times as many steps); past it a warning names
#: the relaxation time.
MAX_AUTO_BURN_IN = 100000
#: The most draws per chain chosen automatically, in the same units.
MAX_AUTO_DRAWS = 50000
#: The caps count samples, not steps: the heat-calibrated step, and so every direction's
#: relaxation in steps, scales with the batch size, so a cap in steps would cut small-batch chains
#: short (at batch 32 a deep linear network relaxed over 33000 steps, and a normal crossing read
#: 0.75 of its target at batch 32 against 1.06 at batch 256 with the same step cap).
CAP_BATCH = 256
#: Steps per calibration round (the heat is read on the second half of them).
CALIBRATION_STEPS = 200
#: Calibration rounds at most (each rescales the step by 1/8 to 2).
MAX_CALIBRATION_ROUNDS = 6


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    num_samples: int,
    nbeta: Optional[float] = None,
    localization: Optional[float] = None,
    step_size: Optional[float] = None,
    num_chains: int = 4,
    num_draws: Optional[int] = None,
    burn_in: Optional[int] = None,
    seed: int = 0,
    sampler: str = "sgld",
    friction: float = 0.1,
    params: Optional[Sequence[Any]] = None,
    mode: str = "eval",
    precision: Optional[float] = DEFAULT_PRECISION,
    gradient: str = "auto",
    draw: str = "auto",
    batched: Optional[bool] = None,
    progress: bool = True,
    probes: Optional[Mapping[str, Any]] = None,
    probe_kernel: bool = False,
    probe_loss_fn: Optional[Callable[..., Any]] = None,
    **kwargs: Any,
) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current weights ``w*``.

    Runs ``num_chains`` chains of localized, tempered SGLD (together, or one after another), each for
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
        batches: any re-iterable of batches (a DataLoader), cycled as needed, or an endless
            iterator (a one-shot one that runs out raises a ``ValueError`` saying so).
        num_samples: ``n``, the number of training samples the loss is an average over.
        nbeta: ``n * beta``; ``None`` means ``min(n / log n, 256)`` (:mod:`online_llc.config`).
        localization: ``gamma``, the pull towards ``w*``; ``None`` means ``0.2 * sqrt(nbeta)``.
        step_size: the sampler's ``epsilon``; ``None`` calibrates it: it starts at
            :func:`online_llc.calibration.step.default_step_size` for the batch size, and rounds of
            :data:`CALIBRATION_STEPS` steps on the first chain rescale it until the measured
            minibatch heat is near :data:`online_llc.calibration.step.TARGET_EXCESS` (a warning says when it
            stays above :data:`online_llc.calibration.step.MAX_EXCESS`). A given step is used as it is.
        num_chains: independent chains ``C``.
        num_draws: draws per chain kept after burn-in ``D``; ``None`` means 1000 times the factor by
            which the step is below ``0.08 / nbeta`` (a smaller step mixes that much more slowly),
            at most :data:`MAX_AUTO_DRAWS`, then doubled while the standard error is above
            ``precision`` times the estimate (up to :data:`MAX_AUTO_DRAWS`; a warning says when that
            is not enough). Both caps are steps of :data:`CAP_BATCH` samples: batches of ``B`` get
            ``CAP_BATCH / B`` times as many steps when smaller.
        burn_in: steps per chain discarded first; ``None`` means two relaxation times of the
            slowest direction, the smaller of the localization's bound ``2 / (epsilon gamma)``
            (a flat direction) and the bound the first chain measures from its own spread,
            ``2 mean(||xi||^2) / epsilon`` (:func:`online_llc.calibration.budget.spread_relaxation`;
            tens of steps on a regular model), at least 500 and at most :data:`MAX_AUTO_BURN_IN`
            (scaled like the draws; with a warning when that is shorter than the relaxation).
        seed: seeds the chains' private generators (chain ``c`` uses ``seed * 1000003 + c``).
        sampler: ``"sgld"`` (default), ``"rmsprop_sgld"`` or ``"sghmc"``; see
            :class:`online_llc.kernel.step.SGLDConfig`.
        friction: SGHMC's friction ``alpha`` in (0, 1] (1 is SGLD).
        params: sample only these parameters (parameter-name patterns, modules or parameters, as
            in :mod:`online_llc.models.groups`), the rest held at ``w*``: the weight-refined LLC of that
            group (Wang et al. 2024). ``None``: all trainable parameters.
        mode: the model's mode during the sampler's passes: ``"eval"`` (the default: dropout
            off, BatchNorm on its running statistics), ``"train"`` or ``"as_is"``; every
            submodule's ``training`` flag is restored afterwards.
        precision: the relative standard error the automatic ``num_draws`` aims for, in (0, 1);
            ``None`` keeps the first draw count. Models whose LLC lives in flat directions (normal
            crossings) mix over the localization's relaxation time, so 1000 draws can leave a
            standard error of 30% or more; ignored when ``num_draws`` is given.
        gradient: ``"plain"`` (the minibatch gradient), ``"control_variate"`` (the control-variate
            gradient ``grad L_B(w* + xi) - grad L_B(w*) + grad L_n(w*)``, whose batch noise is
            small near ``w*``: the step is then sized by its discretization alone, up to
            ``nbeta / B`` times larger, at the cost of one pass over ``batches`` for
            ``grad L_n(w*)`` and one more backward pass per step), or ``"auto"`` (the control
            variate at batches ``B < nbeta / 2`` with a calibrated step, where the plain gradient's
            heat would hold the starting step more than 2x below its discretization bound,
            :func:`~online_llc.calibration.step.control_variate_pays`; the plain gradient for a
            given ``step_size`` or a larger batch; see :mod:`online_llc.kernel.anchor`). The
            default, ``"auto"``, read a d = 12 regression at n = 1e5, batch 32 in 15 s where the
            plain gradient took 93 s (its step 8x smaller), both within 5% of the exact target.
        draw: ``"plain"`` (the paired draw ``d = nbeta (L_B(w* + xi) - L_B(w*))``),
            ``"control_variate"`` (``d - nbeta (grad L_B(w*) - grad L_n(w*)) . xi``: the same
            expectation, since the batch is drawn independently of ``xi``, without the batch's
            linear term, whose noise dominates ``d``'s variance near ``w*``; it needs the
            control-variate gradient, whose centre gradients it reuses at no cost) or ``"auto"``
            (the control-variate draw exactly when the gradient is the control variate).
        batched: step the chains together, one vectorized pass for all of them
            (:mod:`online_llc.kernel.batched`; with 4 chains 3.0-3.8x faster on models of 8-72
            parameters, 2.6x at 9.6k, 1.3x at 51k): ``None`` (the default) batches models of at
            most :data:`~online_llc.kernel.batched.MAX_BATCHED_PARAMS` sampled parameters (larger
            ones run as fast or faster one chain after another) where the model and sampler allow
            it, otherwise runs the chains one after another (with a one-line warning that says
            why when the model is what stops it); ``True`` insists (a ValueError says why it
            cannot); ``False`` runs them one after another. Batched chains draw their noise from
            one generator, so they read other numbers than unbatched ones with the same seed (the
            same distribution).
        progress: print the plan (chains, burn-in and draws, the step, the gradient) to stderr
            once the first chain has fixed it, and show a progress bar when stderr is a terminal.
        probes: ``{name: batch or iterable of batches}``: fixed samples whose losses are
            evaluated at every draw of every chain (one forward pass over them per draw), for each
            set's observable-refined LLC ``nbeta * mean_k E[l_k(w) - l_k(w*)]`` and each sample's
            Bayesian influence ``-Cov(l_k(w) - l_k(w*), d)`` with its standard error
            (:mod:`online_llc.stats.probes`; ``LLCResult.probes``). Samples may be in the training set or not.
        probe_kernel: also each set's loss kernel ``Cov(delta_k, delta_j)`` (``ProbeResult.kernel``,
            ``K x K`` per set and segment: refused past 1 GiB, with the size in the message).
        probe_loss_fn: the probe sets' own loss, ``probe_loss_fn(model, batch)`` of any shape, each
            entry a probe (per token: ``[B, T]``; ``ProbeResult.shape`` keeps it); ``None``: ``loss_fn``.

    Returns:
        An :class:`LLCResult` with the estimate, its standard error, the draws, the measured heat
        and the estimand (``nbeta``, ``localization``, ``step_size``) actually used.

    Raises:
        ValueError: an argument is out of range (the message names it), or ``loss_fn`` does not
            return per-sample losses of shape ``[B]``.
        TypeError: an unknown keyword argument.
        NonFiniteDrawError: a chain produced a non-finite loss (it diverged); the message says
            which chain and draw.

    Example:
        >>> from online_llc import estimate_llc
        >>> from online_llc.models.toy import deep_linear_problem
        >>> p = deep_linear_problem([4, 2], r=2, seed=0)   # regular: lambda = 4, n = 10240
        >>> res = estimate_llc(p.model, p.loss_fn, p.batches, num_samples=p.num_samples,
        ...                    num_chains=2, num_draws=500, progress=False)
        >>> abs(res.mean - p.lam) < 0.3 * p.lam
        True
    """
    reject_unknown("estimate_llc()", kwargs)
    num_chains = check_positive_int("num_chains", num_chains)
    if num_draws is not None:
        num_draws = check_positive_int("num_draws", num_draws)
    if burn_in is not None:
        burn_in = check_nonneg_int("burn_in", burn_in)
    seed = check_int("seed", seed)
    check_choice("mode", mode, MODES)
    check_choice("gradient", gradient, ("plain", "control_variate", "auto"))
    check_choice("draw", draw, ("plain", "control_variate", "auto"))
    if draw == "control_variate" and gradient == "plain":
        raise ValueError(
            "Expected gradient='control_variate' or 'auto' with draw='control_variate' (the draw reuses the "
            "control-variate gradient's centre gradients), got gradient='plain'."
        )
    progress = check_bool("progress", progress)
    if batched is not None:
        batched = check_bool("batched", batched)
    if precision is not None and not (isinstance(precision, (int, float)) and not isinstance(precision, bool)
                                      and 0.0 < float(precision) < 1.0):
        raise ValueError(f"Expected `precision` to be None or a float in (0, 1), got {precision!r}.")
    config = resolve_hyperparameters(
        num_samples=num_samples,
        nbeta=nbeta,
        localization=localization,
        step_size=step_size,
        sampler=sampler,
        friction=friction,
    )
    names = None if params is None else resolve_groups(model, {"params": list(params)})["params"]
    evaluator = LossEvaluator(model, loss_fn, param_names=names, mode=mode)
    center = {n: t.clone() for n, t in evaluator.center().items()}
    require_probes(probes, check_bool("probe_kernel", probe_kernel), probe_loss_fn)
    probe_sets = None if probes is None else ProbeSets(probes, evaluator, center, probe_kernel, num_chains, probe_loss_fn)
    device = next(iter(center.values())).device
    devices = cuda_devices(center)

    given_burn_in, given_num_draws = burn_in, num_draws
    calibration: List[Tuple[float, float]] = []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        stream = batches_forever(batches)
        first = next(stream)
        batch_size = batch_size_of(evaluator, center, first)
        if gradient == "auto":
            # A given step is taken as it is, with the gradient it was chosen for.
            gradient = "control_variate" if step_size is None and control_variate_pays(config.nbeta, batch_size) else "plain"
        if draw == "auto":
            draw = gradient
        if draw == "control_variate" and gradient != "control_variate":
            raise ValueError(
                f"Expected draw='plain' or 'auto' where gradient='auto' takes the plain gradient (batch {batch_size} "
                f"is not below nbeta / 2 = {config.nbeta / 2:.4g}, or step_size is given); got draw='control_variate'."
            )
        bar = tqdm(desc="estimate_llc", unit="step", disable=None if progress else True, leave=False)
        anchor = None
        if gradient == "control_variate":
            bar.set_description("estimate_llc: the full-data gradient at w*")
            # One pass over a re-iterable; from a one-shot stream, an epoch's worth of its
            # batches (the first included), which the chains then go on from.
            epoch = batches
            if is_one_shot(batches):
                epoch = itertools.chain([first], itertools.islice(stream, max(0, math.ceil(num_samples / batch_size) - 1)))
            anchor = full_gradient(evaluator, center, epoch, generator=torch.Generator(device=device).manual_seed(seed))
        if step_size is None:
            # The control variate's batch noise is small: the step starts at its discretization
            # bound, whatever the batch.
            config = resolve_hyperparameters(
                num_samples=num_samples, nbeta=nbeta, localization=localization, step_size=None,
                sampler=sampler, friction=friction, batch_size=None if anchor is not None else batch_size,
            )
        config = replace(config, gradient=gradient, draw=draw)
        pending = [first]

        def next_batch() -> Any:
            return pending.pop() if pending else next(stream)

        chains = Chains(
            evaluator, center, config, num_chains=num_chains, seed=seed, next_batch=next_batch, first=first,
            batches=batches, batched=batched, anchor=anchor, on_step=bar.update,
        )
        # Batched chains take every step together; otherwise the first chain fixes the plan alone
        # and the others follow it one after another.
        lead = list(range(num_chains)) if chains.batched is not None else [0]
        measured = [math.inf]  # the measured relaxation (spread_relaxation) at the end of the burn-in

        def burn() -> Tuple[int, np.ndarray]:
            if given_burn_in is not None:
                return given_burn_in, chains.run(lead, given_burn_in)
            # The localization's bound (a flat direction) caps the burn-in; the leading chains' own
            # spread bounds its slowest direction too, and ends it sooner where it is tight (a regular model).
            parts: List[np.ndarray] = []
            done, target = 0, next_burn_in([], chains.config, burn_in_cap)[0]
            while target is not None:
                parts.append(chains.run(lead, target - done))
                done = target
                rows = np.concatenate(parts, axis=2)
                # Batched chains measure the spread together (their mean ||xi||^2: less noise).
                target, measured[0] = next_burn_in(rows[:, OFFSET_SQ].mean(0), chains.config, burn_in_cap)
            resolve_burn_in(None, chains.config, burn_in_cap, relax=measured[0])  # warns where the cap cuts it short
            return done, rows

        burn_in_cap = scaled_cap(MAX_AUTO_BURN_IN, batch_size, CAP_BATCH)
        draws_cap = scaled_cap(MAX_AUTO_DRAWS, batch_size, CAP_BATCH)
        top = config.step_size
        bar.set_description(f"estimate_llc: {'chains batched' if len(lead) > 1 else f'chain 1/{num_chains}'}")
        if step_size is None:
            # Calibration rounds on the first chain, batched or not (the same decisions from the
            # same statistics as one chain run alone): the excess heat is proportional to the step
            # at a fixed estimand, so each round rescales the step towards the target.
            top = max_step_size(config.nbeta, config.sampler, config.friction, config.step_size)
            for _ in range(MAX_CALIBRATION_ROUNDS):
                out = chains.run(lead, CALIBRATION_STEPS)[0]
                heat, new = recalibrated(out[:, CALIBRATION_STEPS // 2 :], chains.config.step_size, top)
                calibration.append((chains.config.step_size, heat))
                if new == chains.config.step_size:
                    break
                chains.config = replace(chains.config, step_size=new)
        burn_in, head = burn()
        if step_size is None:
            # The gradient noise grows as the chain spreads (singular directions widen slowly), so
            # the heat at the end of the burn-in is checked too, and the burn-in rerun at a
            # recalibrated step while it is hot.
            for _ in range(MAX_CALIBRATION_ROUNDS):
                tail = head[0, :, burn_in // 2 :]
                if tail.shape[1] < CALIBRATION_STEPS // 2:
                    break
                heat, new = recalibrated(tail, chains.config.step_size, top, lower_only=True)
                if new == chains.config.step_size:
                    break
                calibration.append((chains.config.step_size, heat))
                chains.config = replace(chains.config, step_size=new)
                burn_in, head = burn()
        config = chains.config
        num_draws = resolve_num_draws(given_num_draws, config, draws_cap, relax=measured[0])
        bar.total = bar.n + len(lead) * num_draws + (num_chains - len(lead)) * (burn_in + num_draws)
        if progress:
            tqdm.write(
                f"estimate_llc: {num_chains} chains{' (batched)' if len(lead) > 1 else ''} x ({burn_in} burn-in + "
                f"{num_draws} draws) at step_size {config.step_size:.3g}{' (calibrated)' if step_size is None else ''}, "
                f"{config.gradient} gradient and {config.draw} draw (batch {batch_size}), nbeta {config.nbeta:.4g}, "
                f"localization {config.localization:.3g}",
                file=sys.stderr,
            )
        if probe_sets is not None:  # the draws from here on: the leading chains' next step, the others' after their burn-in
            chains.probes = probe_sets
            probe_sets.begin(num_chains, num_draws, {c: chains.steps_taken(c) + (0 if c in lead else burn_in)
                                                     for c in range(num_chains)})
        chain_rows: List[np.ndarray] = list(np.concatenate([head, chains.run(lead, num_draws)], axis=2))
        for c in range(len(lead), num_chains):
            bar.set_description(f"estimate_llc: chain {c + 1}/{num_chains}")
            chain_rows.append(chains.run([c], burn_in + num_draws)[0])
        assert burn_in is not None and num_draws is not None
        if given_num_draws is None and precision is not None:
            # The first draw count suits curved directions; where the LLC lives in flat ones the
            # chains mix over the localization's relaxation time, so draws are doubled (every
            # chain continues where it stopped) until the multi-chain standard error is small.
            while num_draws < draws_cap and imprecise(chain_rows, burn_in, precision):
                extra = min(num_draws, draws_cap - num_draws)
                bar.set_description(f"estimate_llc: {extra} more draws per chain for precision")
                bar.total = bar.n + num_chains * extra
                groups = [lead] + [[c] for c in range(len(lead), num_chains)]
                more = np.concatenate([chains.run(g, extra) for g in groups])
                chain_rows = [np.concatenate([r, m], axis=1) for r, m in zip(chain_rows, more)]
                num_draws += extra

        bar.close()
    result = llc_result(
        np.stack(chain_rows), burn_in, num_draws, config=config, step_given=step_size is not None,
        batch_size=batch_size, precision=None if given_num_draws is not None else precision,
        init_loss=chains.center_loss_sum / max(chains.center_loss_count, 1), calibration=calibration,
        num_samples=num_samples, seed=seed,
    )
    return result if probe_sets is None else replace(result, probes=probe_sets.results(config.nbeta))
