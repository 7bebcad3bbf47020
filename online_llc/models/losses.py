"""Per-sample losses for Hugging Face-style models, usable as an :class:`OnlineLLC` ``loss_fn``.

Batches are mappings as the ``transformers`` data collators make them (``input_ids``,
``attention_mask``, ``labels``, ...); the model is called as ``model(**inputs)`` without the
labels and its output's ``logits`` are scored here, one loss per sample (``reduction="none"``),
so the LLC sees the per-sample negative log likelihood. Nothing here imports ``transformers``.

* :func:`causal_lm_loss` - each sequence's mean next-token cross-entropy over its shifted
  labels (``-100`` ignored), as ``transformers``' ``ForCausalLMLoss`` computes it per token.
* :func:`sequence_classification_loss` - each example's cross-entropy (single-label) or summed
  binary cross-entropy (multi-label).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "sequence_classification_loss", "model_inputs"]

#: Label value that marks a position without a target (``transformers``' convention).
IGNORE_INDEX = -100

# Keys of a captured training batch that are not model inputs for the per-sample pass:
# ``num_items_in_batch`` is the Trainer's token count over a whole accumulated batch.
_NOT_INPUTS = ("labels", "num_items_in_batch")


def _check_batch(batch: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch and "inputs_embeds" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"Expected {where}'s batch to be a mapping with `input_ids` (or `inputs_embeds`), got {keys}; "
            "pass a loss_fn(model, batch) for other batches."
        )
    return batch


def model_inputs(batch: Mapping[str, Any]) -> Dict[str, Any]:
    """The batch's entries the model is called with (everything but ``labels`` and the
    Trainer's ``num_items_in_batch``)."""
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


def _logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise ValueError(f"Expected the model's output to have `logits`, got {type(output).__name__}.")
    return logits


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Each sequence's mean next-token cross-entropy: shape ``[B]``.

    Position ``t``'s logits predict label ``t + 1``; labels equal to ``-100`` are ignored (a
    sequence without any target scores 0). Without ``labels`` the targets are the
    ``input_ids``, with padding (``attention_mask == 0``) ignored. The logits are scored in
    float32 whatever the model's precision.

    Averaged over a batch whose sequences have equal numbers of targets this is the model's own
    loss; with unequal numbers it weighs sequences, not tokens, equally (the LLC's ``n`` counts
    sequences).
    """
    batch = _check_batch(batch, "causal_lm_loss")
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    logits = _logits(model(**model_inputs(batch)))
    targets = labels[:, 1:].to(logits.device)
    scores = logits[:, :-1, :].float()
    ce = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view(targets.shape)
    keep = (targets != IGNORE_INDEX).to(ce.dtype)
    return (ce * keep).sum(1) / keep.sum(1).clamp(min=1)


def sequence_classification_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Each example's negative log likelihood: shape ``[B]``.

    Single-label classification (integer ``labels``): the cross-entropy. Multi-label
    (``model.config.problem_type == "multi_label_classification"``, or float labels of the
    logits' shape): the binary cross-entropies summed over labels. Regression has no default
    (its noise scale sets the likelihood): pass a ``loss_fn``.
    """
    batch = _check_batch(batch, "sequence_classification_loss")
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "Expected the batch to hold `labels` for sequence_classification_loss, got none (a Trainer with "
            "label smoothing or compute_loss_func removes them before the model sees them): pass a loss_fn."
        )
    config = getattr(model, "config", None)
    problem = getattr(config, "problem_type", None)
    logits = _logits(model(**model_inputs(batch))).float()
    labels = labels.to(logits.device)
    if problem == "regression" or logits.shape[-1] == 1 and problem is None:
        raise ValueError(
            "Expected a classification model for sequence_classification_loss, got a regression head "
            "(one output): pass a loss_fn, e.g. 0.5 * (prediction - label)^2 / sigma^2."
        )
    if logits.dim() != 2:
        raise ValueError(
            f"Expected sequence_classification_loss's model to return logits of shape [batch, num_labels], got "
            f"{list(logits.shape)} (a language model's per-token logits?): pass task='causal_lm' or a loss_fn."
        )
    if problem == "multi_label_classification" or (problem is None and labels.is_floating_point()):
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").sum(-1)
    return F.cross_entropy(logits, labels.long(), reduction="none")
