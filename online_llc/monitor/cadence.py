"""How often the shadow chain steps, how long its windows and warm-up are: sized to the run.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
callbacks. The cadence decides when the flow runs at all: one shadow step every
``every_n_steps`` training steps, a window every ``window`` draws, and no estimate before the
chain's warm-up (at least ``min_warmup`` shadow steps from a zero offset). :func:`auto_cadence`
chooses them from the run's length ``T`` (``total_steps``), a pure function of its arguments.

Goals, for a run of ``T`` optimizer steps:

1. the overhead stays within budget: a shadow step costs 1.3x (a compute-bound model) to 3x
   (a small CPU MLP: :data:`SHADOW_STEP_COST`) a training step, so the overhead is at most about
   ``3 / every_n_steps`` per chain (the estimate the warning quotes), ``every_n_steps >= 30``
   keeps it within 10%, and the default 35 within 9% (1.08-1.09 measured on that MLP);
2. the warm-up ends within the first :data:`WARMUP_FRACTION` (10%) of the run: its floor of
   :data:`~online_llc.monitor.track.MIN_AUTO_WARMUP` (100) shadow steps spans ``100 * every_n_steps``
   training steps;
3. the rest of the run yields at least :data:`TARGET_WINDOWS` (20) windows.

The rule, in that order:

* ``every_n_steps = clamp(min(T // 1000, 0.9 T // (20 W)), 1, 35)``, ``W`` the window (40 unless
  given): the sparsest cadence up to the default 35 whose 100-step warm-up fits in 10% of the run
  and whose windows number 20. Runs of ``T >= 30000`` steps are within the overhead budget
  (35 from ``T = 35000`` on: the defaults); shorter runs get a denser cadence, down to every
  step, rather than no estimate, and one warning says what it costs.
* With ``S = T // every_n_steps`` shadow steps, the warm-up floor is
  ``clamp(S // 10, 20, 100)``: it shrinks below 100 only when even a shadow step at every
  training step cannot fit it into 10% of the run (``T < 1000``); its ceiling
  (:data:`~online_llc.monitor.track.MAX_AUTO_WARMUP`, 400) and the floor after a weight jump
  (:data:`~online_llc.monitor.track.MIN_REWARMUP`, 60) shrink in proportion, and so does the stationary
  tail the equilibrium test needs (30 draws, at least 5).
* ``window = clamp((S - warm-up floor) // 20, 10, 40)``: 20 windows after the warm-up, with at
  least :data:`MIN_WINDOW` (10) draws each (a window's autocorrelation-aware standard error
  needs a few batch means of draws) and the default 40 at most.

Given values rule: an ``every_n_steps`` or ``window`` passed as an int is used as it is (the other
is derived with it; with both given, only a run too short for any estimate is warned about), and
a fixed ``warmup`` count replaces the warm-up floor in the plan.
Unknown ``T``: the defaults (35, 40, warm-up from 100 shadow steps).
A run shorter than one warm-up floor and one window, even at every step, yields no estimate at
all; the warning says so.

Online cadence (``python benchmarks/overhead.py`` prints the overhead):

* ``every_n_steps = 35`` (what ``"auto"`` means for runs of unknown length or of 35000 steps
  and more; :mod:`online_llc.monitor.cadence` sizes shorter runs). A shadow step costs one
  forward+backward and one forward on one batch (in half batches) plus the Gaussian noise for
  every parameter and the monitor's own per-step work: 2.5-3.0x a training step of a small MLP
  (784-256-256-10, Adam, batch 128, one thread), less for compute-bound models (1.33x). The
  overhead is about ``shadow cost / every_n_steps``: on that MLP 1.09 at 35, 1.10-1.11 at 30
  and 1.10-1.12 at 25 (the default before the heat measurements made the step dearer), so 35 is
  the cadence that keeps the bound of 1.10 on it.
* ``window = 40`` draws: a window then spans 1400 training steps. The estimate follows a step
  change within 3-4 windows (``benchmarks/step_change.py``), so lag is about
  ``4 * every_n_steps * window`` training steps: halve ``every_n_steps`` to halve the lag at twice
  the overhead, or shorten ``window`` (noisier windows, wider band). Windows should hold well
  over the chain's autocorrelation time (``LLCEstimate.ess`` shows it).
* ``warmup = "auto"``: equilibrium is detected from each chain's draws and squared offset norm
  (MSER-5, :mod:`online_llc.monitor.warmup`), at least 100 shadow steps for a chain starting at zero
  offset (at a saddle the chain leaves slowly at first, which looks stationary); runs too short
  for that within their first 10% get a proportionally shorter floor (at least 20).
* ``horizon = 4`` windows: the band's standard error also counts correlation slower than one
  window (see :class:`online_llc.monitor.window.WindowStats`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Optional, Union

from online_llc.errors import as_int, check_nonneg_int, check_positive_int, describe

__all__ = [
    "group_budget",
    "AUTO",
    "DEFAULT_EVERY_N_STEPS",
    "DEFAULT_WINDOW",
    "DEFAULT_WARMUP",
    "DEFAULT_HORIZON",
    "Cadence",
    "MIN_WARMUP_FLOOR",
    "MIN_WINDOW",
    "OVERHEAD_BUDGET_STEPS",
    "SHADOW_STEP_COST",
    "TARGET_WINDOWS",
    "WARMUP_FRACTION",
    "auto_cadence",
    "check_cadence_option",
    "next_step",
]

DEFAULT_EVERY_N_STEPS: int = 35
DEFAULT_WINDOW: int = 40
DEFAULT_WARMUP: str = "auto"
DEFAULT_HORIZON: int = 4

#: The value of ``every_n_steps`` and ``window`` that asks :func:`auto_cadence` to choose.
AUTO = "auto"
#: A shadow step's cost in training steps, the most measured: a small CPU MLP (784-256-256-10,
#: Adam, batch 128, one thread), where the monitor's fixed per-step work weighs most; 2.5-3.0x
#: there (``python benchmarks/overhead.py``: ms per shadow step over ms per plain step), about
#: 1.3x on compute-bound models. The overhead the plan quotes is ``SHADOW_STEP_COST / every_n_steps``.
SHADOW_STEP_COST = 3.0
#: The densest cadence within the overhead budget: ``3 / 30`` is 10% of training compute per
#: chain (the default, 35, is sparser).
OVERHEAD_BUDGET_STEPS = 30
#: Tracking windows a run of known length should yield.
TARGET_WINDOWS = 20
#: The share of the run the warm-up floor may take.
WARMUP_FRACTION = 0.1
#: The fewest draws in an automatically sized window.
MIN_WINDOW = 10
#: The shortest warm-up floor from a zero offset for short runs (shadow steps).
MIN_WARMUP_FLOOR = 20

# The warm-up floors and ceilings of track.py, and the equilibrium test's tail (warmup.py), at
# full length. (Repeated here, not imported: track.py imports this module's Cadence.)
_WARMUP = 100
_MAX_WARMUP = 400
_REWARMUP = 60
_TAIL = 30


@dataclass(frozen=True)
class Cadence:
    """The monitor's schedule: when it samples and how long its windows and warm-ups are.

    Attributes:
        every_n_steps: training steps per shadow step.
        window: draws per chain per window.
        min_warmup: the shortest data-driven warm-up from a zero offset (shadow steps).
        max_warmup: the longest one (shadow steps).
        min_rewarmup: the shortest one after a jump of the training weights.
        warmup_tail: draws of stationary tail the equilibrium test needs (a multiple of 5).
        total_steps: the run's length it was sized for (``None``: unknown).
        overhead: the estimated monitor overhead per chain, ``SHADOW_STEP_COST / every_n_steps`` of
            training compute (at most about that: compute-bound models pay less).
        warmup: the warm-up the plan counts on: ``min_warmup``, or the fixed number of shadow
            steps when ``warmup`` is an int.
        expected_windows: windows after that warm-up, ``(S - warmup) // window`` for
            ``S = total_steps // every_n_steps`` shadow steps (``None`` when the length is unknown).
        message: one line for the user when the run is too short for the goals (over the
            overhead budget, fewer than :data:`TARGET_WINDOWS` windows, or no estimate at all);
            ``None`` otherwise.
    """

    every_n_steps: int = DEFAULT_EVERY_N_STEPS
    window: int = DEFAULT_WINDOW
    min_warmup: int = _WARMUP
    max_warmup: int = _MAX_WARMUP
    min_rewarmup: int = _REWARMUP
    warmup_tail: int = _TAIL
    total_steps: Optional[int] = None
    overhead: float = SHADOW_STEP_COST / DEFAULT_EVERY_N_STEPS
    warmup: int = _WARMUP
    expected_windows: Optional[int] = None
    message: Optional[str] = None


def check_cadence_option(name: str, value: Union[int, str], minimum: int) -> Union[int, str]:
    """``value`` if it is :data:`AUTO`, else it as an int ``>= minimum``; raise ``ValueError`` naming
    ``name`` otherwise."""
    if value == AUTO:
        return AUTO
    v = as_int(value)
    if v is None or v < minimum:
        accepted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"Expected `{name}` to be {accepted} or {AUTO!r}, got {value!r}.")
    return v


def next_step(step: object, previous: Optional[int]) -> int:
    """The training step a monitor records next: ``step`` (any integer, numpy's and 0-d tensors
    included) when it comes after ``previous`` (``None``: nothing recorded yet, any step
    ``>= 0``); when ``step`` is ``None``, the next count (``previous + 1``, or 1 at first).

    A step recorded twice is an error, not a no-op: it means the loop calls the monitor twice
    per optimizer step (or passes a constant), and ignoring it would hide a monitor that
    samples at the wrong cadence or not at all.

    Raises:
        ValueError: naming ``step``, for a non-integer, negative, repeated or earlier step.
    """
    if step is None:
        return 1 if previous is None else previous + 1
    v = as_int(step)
    low = 0 if previous is None else previous + 1
    if v is None or v < low:
        what = "a non-negative int" if previous is None else f"an int > the previous step {previous} (one call per optimizer step)"
        # A batch where the step belongs: the arguments were swapped (update takes the batch first).
        hint = "" if isinstance(step, (int, float, str)) or as_int(step) is not None else " (update takes the batch first: update(batch, step))"
        raise ValueError(f"Expected `step` to be {what}, got {describe(step)}{hint}.")
    return v


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def auto_cadence(
    total_steps: Optional[int],
    *,
    every_n_steps: Union[int, str] = AUTO,
    window: Union[int, str] = AUTO,
    warmup: Union[int, str] = AUTO,
) -> Cadence:
    """The cadence for a run of ``total_steps`` optimizer steps (the rule is in the module docstring).

    Args:
        total_steps: the run's length in optimizer steps; ``None`` when unknown (then
            :data:`AUTO` means the defaults, 35 and 40).
        every_n_steps: training steps per shadow step, or :data:`AUTO`.
        window: draws per window, or :data:`AUTO`.
        warmup: the monitor's warm-up policy: :data:`AUTO` (data-driven, from at least 100 shadow
            steps, fewer for short runs) or a fixed number of shadow steps, which the plan then
            counts on instead.

    Returns:
        The :class:`Cadence`, with ``message`` set when the run is too short for the goals.

    Example:
        >>> c = auto_cadence(100_000)
        >>> c.every_n_steps, c.window, c.min_warmup, c.message
        (35, 40, 100, None)
        >>> c = auto_cadence(220)
        >>> c.every_n_steps, c.window, c.min_warmup, c.expected_windows
        (1, 10, 22, 19)
    """
    k_given = check_cadence_option("every_n_steps", every_n_steps, 1)
    w_given = check_cadence_option("window", window, 2)
    fixed = None if warmup == AUTO else check_nonneg_int("warmup", warmup)
    if total_steps is None:
        k = DEFAULT_EVERY_N_STEPS if k_given == AUTO else k_given
        w = DEFAULT_WINDOW if w_given == AUTO else w_given
        return Cadence(every_n_steps=k, window=w, overhead=SHADOW_STEP_COST / k, warmup=_WARMUP if fixed is None else fixed)
    t = check_positive_int("total_steps", total_steps)

    if k_given == AUTO:
        w_for_k = DEFAULT_WINDOW if w_given == AUTO else w_given
        lead = _WARMUP if fixed is None else fixed
        by_warmup = int(t // (lead / WARMUP_FRACTION)) if lead > 0 else DEFAULT_EVERY_N_STEPS
        by_windows = int((1 - WARMUP_FRACTION) * t // (TARGET_WINDOWS * w_for_k))
        k = _clamp(min(by_warmup, by_windows), 1, DEFAULT_EVERY_N_STEPS)
    else:
        k = k_given
    shadow = t // k
    floor = _clamp(int(WARMUP_FRACTION * shadow), MIN_WARMUP_FLOOR, _WARMUP)
    warm = floor if fixed is None else fixed
    w = _clamp((shadow - warm) // TARGET_WINDOWS, MIN_WINDOW, DEFAULT_WINDOW) if w_given == AUTO else w_given
    windows = max(shadow - warm, 0) // w
    cadence = Cadence(
        every_n_steps=k,
        window=w,
        min_warmup=floor,
        max_warmup=_MAX_WARMUP * floor // _WARMUP,
        min_rewarmup=max(_REWARMUP * floor // _WARMUP, 5),
        warmup_tail=_clamp(5 * (floor // 10), 5, _TAIL),
        total_steps=t,
        overhead=SHADOW_STEP_COST / k,
        warmup=warm,
        expected_windows=windows,
    )
    shrunk = (fixed is None and floor < _WARMUP) or (w_given == AUTO and w < DEFAULT_WINDOW)
    return _with_message(cadence, k_auto=k_given == AUTO, w_auto=w_given == AUTO, shrunk=shrunk)


def _with_message(c: Cadence, *, k_auto: bool, w_auto: bool, shrunk: bool) -> Cadence:
    """``c`` (sized for a known length) with its one-line message when the run is too short for the goals."""
    t, k, w, windows = c.total_steps, c.every_n_steps, c.window, c.expected_windows or 0
    cost = f"about {100 * c.overhead:.0f}% of training compute per chain"
    sizes = f"windows of {w} draws, warm-up from {c.warmup} shadow steps"
    if windows == 0:
        msg = (
            f"OnlineLLC: a {t}-step run is too short for any LLC estimate at every_n_steps={k} with {sizes}: "
            f"the first estimate needs at least {(c.warmup + w) * k} training steps. Pass a smaller "
            "every_n_steps or window, or train longer."
        )
    elif (k_auto or w_auto) and ((k_auto and k < OVERHEAD_BUDGET_STEPS) or windows < TARGET_WINDOWS or shrunk):
        budget = f"{100 * SHADOW_STEP_COST / OVERHEAD_BUDGET_STEPS:.0f}%"
        if k_auto and k < OVERHEAD_BUDGET_STEPS:
            head = f"is too short for the {budget} overhead budget (every_n_steps >= {OVERHEAD_BUDGET_STEPS}): every_n_steps={k} costs {cost}"
        else:
            head = f"is short for the monitor's defaults: every_n_steps={k} costs {cost}"
        msg = (
            f"OnlineLLC: a {t}-step run {head}; {sizes}; about {windows} estimates after warm-up. "
            "Pass every_n_steps= and window= to choose otherwise."
        )
    else:
        return c
    return replace(c, message=msg)


def group_budget(option: Union[int, str], num_groups: int, cadence: Cadence, warmup: Union[int, str] = AUTO) -> int:
    """The group shadow steps per shadow step: ``option`` as given, or for :data:`AUTO` the fewest
    that let every group finish its longest warm-up (``max_warmup``, or ``warmup`` when fixed)
    and one window within the first half of a
    run of known length: ``ceil(G (max_warmup + window) / S)``, ``S`` the shadow steps in the first
    half and ``G`` the number of groups, at least 1 and at most ``G`` (every group at every
    shadow step). Each group step costs about what a shadow step of the whole model costs, so
    the monitor's cost grows ``1 + budget``-fold. One warning says so when the budget is above 1,
    or what each group gets when even ``G`` cannot meet it, or, when the run's length is unknown
    (budget 1), how long a group's first estimate may take; each says what to pass."""
    if option != AUTO:
        return int(option)
    if num_groups == 0:
        return 1
    per_group = (cadence.max_warmup if warmup == AUTO else int(warmup)) + cadence.window
    if cadence.total_steps is None:
        warnings.warn(
            f"OnlineLLC: {num_groups} groups with an unknown run length: group_budget=1 observes each group every "
            f"{num_groups} shadow steps, so a group's first estimate needs up to {num_groups * per_group} shadow steps "
            f"({num_groups * per_group * cadence.every_n_steps} training steps). Pass total_steps= to size the "
            "budget to the run, or group_budget= to choose it.",
            stacklevel=3,
        )
        return 1
    half = max(cadence.total_steps // (2 * cadence.every_n_steps), 1)
    budget = min(max(math.ceil(num_groups * per_group / half), 1), num_groups)
    if budget * half < num_groups * per_group:
        warnings.warn(
            f"OnlineLLC: a {cadence.total_steps}-step run is too short to estimate every one of {num_groups} groups "
            f"within its first half: a group needs up to {per_group} draws (warm-up and a window) and gets "
            f"{budget * half // num_groups} there even with group_budget={budget} (every group at every shadow step). "
            "Pass a smaller every_n_steps or window, fewer groups, or train longer.",
            stacklevel=3,
        )
    elif budget > 1:
        warnings.warn(
            f"OnlineLLC: group_budget={budget} for {num_groups} groups in a {cadence.total_steps}-step run: every "
            f"shadow step also runs {budget} group steps, about {1 + budget}x the monitor's cost without groups, so "
            "that every group is estimated within the run's first half. Pass group_budget=1 to keep the cost "
            "(the groups' first estimates then come later).",
            stacklevel=3,
        )
    return budget
