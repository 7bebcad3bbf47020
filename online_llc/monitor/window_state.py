"""The checkpoint of :class:`~online_llc.monitor.window.WindowStats`: its layout, and a validation that
refuses a damaged or mismatched state before anything is restored.

The state holds plain Python values only (safe for ``torch.load(weights_only=True)``): the
pending draws of the current window, one row per chain for each of :data:`ROW_KEYS`, and the
previous windows' draws that the slow-correlation floor looks back on. Only the current
version loads (states of versions 2 and 3, before 0.2.0, are refused by name).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from online_llc.errors import check_nonneg_int

__all__ = ["ROW_KEYS", "ParsedState", "dump_state", "parse_state"]

# Version 3 added the pending draws' offset norms ("o"), version 4 their measured discretization
# biases ("e").
_STATE_VERSION = 4
#: The pending draws' rows by state key: draws, noise variances, flags, heat biases, offset norms,
#: discretization biases (NaN where none was measured; stored as None, since NaN is not equal to
#: itself and a state should compare equal to its copy).
ROW_KEYS = ("d", "v", "f", "b", "o", "e")
_STATE_KEYS = frozenset({"version", "window", "num_chains", "horizon", "count", "past", "start_step", "last_step", *ROW_KEYS})


class ParsedState(NamedTuple):
    """A validated state: the pending rows (``[num_chains, count]`` float64 arrays by
    :data:`ROW_KEYS`), their count, the past windows' draws, and the window's step range."""

    pending: Dict[str, np.ndarray]
    count: int
    past: List[np.ndarray]
    start_step: Optional[int]
    last_step: Optional[int]


def dump_state(
    *,
    window: int,
    num_chains: int,
    horizon: int,
    pending: Mapping[str, np.ndarray],
    past: Sequence[np.ndarray],
    start_step: Optional[int],
    last_step: Optional[int],
) -> Dict[str, Any]:
    """The state of a window holding the ``[num_chains, count]`` rows ``pending`` (by
    :data:`ROW_KEYS`) after the ``past`` windows' draws."""
    count = int(pending["d"].shape[1])
    rows: Dict[str, Any] = {key: np.asarray(pending[key]).tolist() for key in ROW_KEYS if key != "e"}
    rows["e"] = [[None if math.isnan(x) else x for x in row] for row in np.asarray(pending["e"]).tolist()]
    return {
        "version": _STATE_VERSION,
        "window": int(window),
        "num_chains": int(num_chains),
        "count": count,
        "horizon": int(horizon),
        "past": [np.asarray(p).tolist() for p in past],
        **rows,
        "start_step": None if start_step is None else int(start_step),
        "last_step": None if last_step is None else int(last_step),
    }


def parse_state(state: Mapping[str, Any], *, window: int, num_chains: int, horizon: int) -> ParsedState:
    """Validate ``state`` against the window it is restored into.

    Raises:
        KeyError: if keys are missing or unexpected.
        ValueError: if ``window``, ``num_chains`` or ``horizon`` differ, or the pending draws,
            steps or past windows are inconsistent.
    """
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"Expected `state['version']` to be {_STATE_VERSION}, got {state.get('version')!r}.")
    missing = sorted(_STATE_KEYS - set(state))
    unexpected = sorted(set(state) - _STATE_KEYS)
    if missing or unexpected:
        raise KeyError(f"WindowStats state dict: missing keys {missing}, unexpected keys {unexpected}.")
    for key, own in (("window", window), ("num_chains", num_chains), ("horizon", horizon)):
        if state[key] != own:
            raise ValueError(f"Expected `state['{key}']` to be {own} (this WindowStats' {key}), got {state[key]!r}.")
    count = state["count"]
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < window:
        raise ValueError(f"Expected `state['count']` to be an int in [0, {window - 1}], got {count!r}.")
    pending = _pending(state, num_chains, count)
    start, last = _steps(state, count)
    return ParsedState(pending, count, _past(state["past"], window, num_chains, horizon), start, last)


def _pending(state: Mapping[str, Any], num_chains: int, count: int) -> Dict[str, np.ndarray]:
    shape = (num_chains, count)
    arrays = {}
    for key in ROW_KEYS:
        expected = f"{num_chains} lists of {count} floats (one per chain)"
        try:
            raw = state[key]
            if key == "e" and isinstance(raw, list):
                raw = [[np.nan if x is None else x for x in row] if isinstance(row, list) else row for row in raw]
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"Expected `state['{key}']` to be {expected}.") from None
        if arr.shape != shape and not (count == 0 and arr.size == 0):
            raise ValueError(f"Expected `state['{key}']` to be {expected}, got shape {arr.shape}.")
        arr = arr.reshape(shape)
        # Discretization biases are NaN where none was measured.
        if not np.all(np.isfinite(arr) | (np.isnan(arr) if key == "e" else False)):
            raise ValueError(f"Expected `state['{key}']` to be finite{' or NaN' if key == 'e' else ''}.")
        arrays[key] = arr
    return arrays


def _steps(state: Mapping[str, Any], count: int) -> tuple[Optional[int], Optional[int]]:
    steps = {}
    for key in ("start_step", "last_step"):
        value = state[key]
        if value is not None:
            check_nonneg_int(f"state['{key}']", value)
        steps[key] = value
    start, last = steps["start_step"], steps["last_step"]
    if start is not None and (last is None or last < start):
        raise ValueError(f"Expected `state['last_step']` to be >= start_step ({start}), got {last!r}.")
    if (count > 0) != (start is not None):
        raise ValueError(
            f"Expected `state['start_step']` to be set exactly when `count` > 0, "
            f"got start_step={start!r} with count={count}."
        )
    return start, last


def _past(raw: Any, window: int, num_chains: int, horizon: int) -> List[np.ndarray]:
    past = []
    for p in raw:
        arr = np.asarray(p, dtype=np.float64)
        # With `gather` the past windows hold every rank's chains: any chain count >= ours.
        # A window summarised on its trailing half holds from window / 2 draws per chain.
        if (
            arr.ndim != 2
            or not 2 * arr.shape[1] >= window
            or arr.shape[1] > window
            or arr.shape[0] < num_chains
            or not np.all(np.isfinite(arr))
        ):
            raise ValueError(
                f"Expected `state['past']` to hold finite arrays of shape [chains >= {num_chains}, "
                f"window / 2 .. {window}]."
            )
        past.append(arr)
    if len(past) > max(horizon - 1, 0):
        raise ValueError(f"Expected `state['past']` to hold at most {horizon - 1} windows, got {len(past)}.")
    return past
