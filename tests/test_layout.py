"""The package's shape: a small public API, wings that import only the wings below them, no
module past 400 lines, and the import paths users hold."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import online_llc

ROOT = Path(online_llc.__file__).parent


def test_public_api_is_small_and_importable() -> None:
    names = set(online_llc.__all__)
    assert len(online_llc.__all__) <= 20 and len(names) == len(online_llc.__all__)
    assert {"OnlineLLC", "MonitorSettings", "estimate_llc", "LLCResult", "LLCEstimate", "recommend_step_size"} <= names
    for name in names:
        assert getattr(online_llc, name) is not None


def test_old_user_import_paths_still_work() -> None:
    from online_llc import OnlineLLC, estimate_llc  # noqa: F401
    from online_llc.callbacks import LOGGED_KEYS, OnlineLLCCallback, OnlineLLCTrainerCallback  # noqa: F401

    assert OnlineLLC.__module__ == "online_llc.monitor.estimator"


def test_every_module_imports_and_fits_in_400_lines() -> None:
    """Every module of every wing imports on its own (no import circle hides behind an import
    order), and none is longer than 400 lines."""
    for info in pkgutil.walk_packages([str(ROOT)], prefix="online_llc."):
        importlib.import_module(info.name)
    for path in [*ROOT.rglob("*.py"), *(ROOT.parent / "callbacks").glob("*.py")]:
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path} has {lines} lines"


def test_every_configured_sampler_has_an_update() -> None:
    from online_llc.config import SAMPLERS
    from online_llc.kernel.updates import _UPDATES

    assert tuple(_UPDATES) == SAMPLERS
