"""The opt-in compiled path: the kernel's passes through ``torch.compile``.

Flow: training loop -> ShadowSampler -> LossEvaluator (**the compiled loss**) -> the kernel's
passes. With ``compile=True`` (or a mode's name, :data:`COMPILE_MODES`) the evaluator calls
``torch.compile(loss_fn)`` instead of ``loss_fn``: every forward pass of a shadow step, at the
centre and at ``w* + xi``, runs as one compiled graph, and its backward as the graph AOTAutograd
derived from it. The substituted weights (``torch.func.functional_call``) are the graph's inputs,
not constants, so the chain's moving offsets do not recompile it; what does is a new batch shape
(the last batch of an epoch, the halves of a measuring step: dynamic shapes after the second
size), the grad mode (the centre's pass takes no gradient) and the model's mode flags, a handful
of graphs per monitor. Each weight group's passes (``groups=``) differentiate other parameters,
so each group compiles graphs of its own; past torch's recompile limit for one function
(``torch._dynamo.config.recompile_limit``, 8 by default) the rest run eagerly, with the same
numbers. The update, noise and statistics stay in eager ``torch._foreach_*`` calls,
a fixed number per parameter list.

Two choices keep the compiled chain the eager chain:

* ``fallback_random``: the model's random draws (dropout in ``mode="train"``) use the eager
  kernels, hence the generator that :func:`online_llc.kernel.randomness.private_rng` forks and
  rewinds, so the centre's pass and the sample's pass still see the same masks; Inductor's own
  generator would draw different masks in the two graphs.
* in a mode that captures CUDA graphs (``"reduce-overhead"``, ``"max-autotune"``), a graph's
  outputs live in memory the next replay overwrites, while the kernel keeps the centre's losses
  across the chains of a step: the losses (``[B]`` floats) are cloned.

The first calls wait for the compiler (seconds on a small model, a minute on a large one, on
CPU); one line on standard error says so. On CPU the compiled graphs run about as fast as eager
ones for matmul-bound models; the gain is on GPUs, where fused kernels and CUDA graphs remove
the launch overhead of small layers (``benchmarks/gpu_check.py --compile``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Set, Union

import torch
from torch import Tensor

__all__ = ["COMPILE_MODES", "check_compile", "compiled_loss"]

#: The ``loss_fn`` objects whose compilation was announced on standard error.
_TOLD: Set[int] = set()

#: The modes ``compile=`` accepts by name (``torch.compile``'s own); ``True`` means ``"default"``.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(value: Union[bool, str, None]) -> Optional[str]:
    """``compile=`` as a mode's name, or ``None`` when off (``False`` or ``None``).

    Raises:
        ValueError: naming ``compile`` and what it accepts.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(
        f"Expected `compile` to be a bool or one of {', '.join(map(repr, COMPILE_MODES))}, got {value!r}."
    )


def compiled_loss(loss_fn: Callable[[Any, Any], Tensor], mode: str) -> Callable[[Any, Any], Tensor]:
    """``loss_fn(model, batch)`` compiled in ``mode`` (:data:`COMPILE_MODES`), with the model's
    random draws left to the eager generator and CUDA-graph outputs cloned (see the module)."""
    from torch._inductor import list_mode_options  # imported on use: Inductor is slow to import

    options = dict(list_mode_options(mode))
    options["fallback_random"] = True
    graphs = bool(options.get("triton.cudagraphs"))
    # torch.compile takes a mode or options, not both: the mode's options, plus ours.
    fn = torch.compile(loss_fn, options=options)

    def run(model: Any, batch: Any) -> Tensor:
        if id(loss_fn) not in _TOLD:  # once per loss_fn (a monitor's groups share it)
            _TOLD.add(id(loss_fn))
            print(
                f"online_llc: compiling loss_fn with torch.compile (mode {mode!r}); the first shadow steps wait for "
                "the compiler (a new batch size compiles again once).",
                file=sys.stderr,
            )
        out = fn(model, batch)
        return out.clone() if graphs and isinstance(out, Tensor) else out

    return run
