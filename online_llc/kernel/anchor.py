"""The control variate's anchor: the full-data gradient ``grad L_n(w*)`` at the centre.

The control-variate gradient ``grad L_B(w* + xi) - grad L_B(w*) + grad L_n(w*)`` (Baker,
Fearnhead, Fox and Nemeth 2019, "Control variates for stochastic gradient MCMC") has the plain
minibatch gradient's expectation, and batch noise only from the difference of the two batch
gradients: along a direction of curvature ``h`` about ``||xi||`` times the spread of the
per-sample curvatures, where the plain gradient carries the spread of the per-sample gradients
themselves. Its anchor is computed once per centre, with one pass over the data.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping

import torch
from torch import Tensor

from online_llc.kernel.evaluator import LossEvaluator
from online_llc.kernel.passes import moved_items
from online_llc.kernel.randomness import private_rng
from online_llc.kernel.updates import state_dtype

__all__ = ["full_gradient"]


def full_gradient(
    evaluator: LossEvaluator, center: Mapping[str, Tensor], batches: Iterable[Any], *, generator: torch.Generator
) -> Dict[str, Tensor]:
    """``grad L_n(w*) = sum_b |b| grad L_b(w*) / sum_b |b|`` over one pass of ``batches``.

    The passes run as the kernel's do: in the evaluator's mode, with the model's own randomness
    drawn from ``generator``, the model, its ``.grad`` fields and buffers untouched. The sums are
    accumulated in float64.

    Returns:
        The gradient by parameter name, in the chain state's dtype (float32, or float64 for a
        float64 parameter).

    Raises:
        ValueError: ``batches`` yields no batch.
    """
    zero = {n: torch.zeros_like(t, dtype=state_dtype(t.dtype)).requires_grad_(True) for n, t in center.items()}
    leaves = list(zero.values())
    total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in zero.items()}
    count = 0
    with evaluator.mode_context(), private_rng(center, generator), torch.enable_grad(), evaluator.pass_session():
        for batch in batches:
            losses = evaluator.losses(moved_items(center, zero), batch)
            for (name, acc), g in zip(total.items(), evaluator.grads(losses.sum(), leaves)):
                if g is not None:
                    acc.add_(g.double())
            count += losses.numel()
    if count == 0:
        raise ValueError("Expected `batches` to yield at least one batch, got an empty iterable.")
    return {n: (acc / count).to(zero[n].dtype) for n, acc in total.items()}
