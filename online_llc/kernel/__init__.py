"""The kernel: one SGLD step (or a variant) of an offset ``xi`` at ``w* + xi``, with paired losses.

* :mod:`~online_llc.kernel.step` - the step: the draw, its noise, the update (:func:`sampler_step`);
  :mod:`~online_llc.kernel.anchor` - the control variate's anchor, the full-data gradient at ``w*``.
* :mod:`~online_llc.kernel.passes` - the forward and backward passes of a step, one program for
  whole and sharded parameters; :mod:`~online_llc.kernel.halves` splits a batch in two.
* :mod:`~online_llc.kernel.updates` - the update maths of each sampler, fused over tensors;
  :mod:`~online_llc.kernel.noise` - the injected noise, one stream drawn in chunks.
* :mod:`~online_llc.kernel.evaluator` - per-sample losses at substituted weights, the model left
  alone; :mod:`~online_llc.kernel.fsdp` - the same on FSDP2 shards;
  :mod:`~online_llc.kernel.sharding` refuses the sharded models it cannot substitute.
* :mod:`~online_llc.kernel.randomness` - private generators, the training run's streams untouched;
  :mod:`~online_llc.kernel.hostreads` counts host reads (device syncs).
* :mod:`~online_llc.kernel.diagnostics` - the MALA acceptance of one proposal.
"""

from online_llc.kernel.diagnostics import mala_acceptance
from online_llc.kernel.evaluator import LossEvaluator, LossFn
from online_llc.kernel.step import SGLDInfo, sampler_step, sgld_step

__all__ = ["LossEvaluator", "LossFn", "SGLDInfo", "mala_acceptance", "sampler_step", "sgld_step"]
