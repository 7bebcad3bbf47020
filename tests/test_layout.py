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


def test_every_benchmark_imports() -> None:
    """Every benchmark script imports (its top level only; the work runs under ``__main__``), so a
    moved or renamed function of the package breaks a test, not a later benchmark run. A third-party
    package a benchmark compares against (devinterp) may be missing: such a script exits naming the
``pip install`` it needs."""
    import importlib.util
    import sys

    bench = ROOT.parent / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        for path in sorted(bench.glob("*.py")):
            spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            try:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            except ModuleNotFoundError as e:
                if e.name is None or e.name.split(".")[0] in ("online_llc", path.stem) or (bench / f"{e.name}.py").exists():
                    raise
            except SystemExit as e:  # a script that says which optional package to install
                if "pip install" not in str(e.code):
                    raise
    finally:
        sys.path.remove(str(bench))
