"""Models and what the estimators need to know of them.

* :mod:`~online_llc.models.theory` - theoretical learning coefficients of known models.
* :mod:`~online_llc.models.toy` - models with a known learning coefficient, for validation.
* :mod:`~online_llc.models.groups` - parameter groups for weight-refined (per-module) LLCs;
  :mod:`~online_llc.models.heads` - per-head groups of attention layers.
* :mod:`~online_llc.models.losses` - per-sample losses for Hugging Face-style models.
"""

from online_llc.models import theory, toy
from online_llc.models.groups import groups_by_child, groups_by_linear, resolve_groups
from online_llc.models.heads import ParamSlice, attention_heads, groups_by_head
from online_llc.models.losses import causal_lm_loss, sequence_classification_loss

__all__ = [
    "ParamSlice",
    "attention_heads",
    "causal_lm_loss",
    "groups_by_child",
    "groups_by_head",
    "groups_by_linear",
    "resolve_groups",
    "sequence_classification_loss",
    "theory",
    "toy",
]
