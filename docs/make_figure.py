"""Regenerate the README's figure from the current code, or check that it is current.

    python docs/make_figure.py            run the stagewise demo and write docs/stagewise_dln.png
                                          and docs/stagewise_dln.csv (the numbers it is drawn from)
    python docs/make_figure.py --check    run it into a temporary folder and exit 1 if its CSV
                                          differs from docs/stagewise_dln.csv (relative 1e-4)

The demo (``online_llc.demos.stagewise_dln``) is seeded and runs on the CPU with one thread, so
its CSV is deterministic on one machine: a difference means the code changed what the figure
shows. Across CPUs the float32 kernels sum in other orders (another vector width), and the CSV's
derived columns (a variance of differences, its ratio to the filter's variance) carry that
rounding up to a few 1e-6 relative (measured 2.1e-6 on the same commit on two machines), so the
check allows 1e-4: far below what a figure can show, far above the rounding. About 45 s on 2
cores.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import shutil
import sys
import tempfile
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PNG = os.path.join(HERE, "stagewise_dln.png")
CSV = os.path.join(HERE, "stagewise_dln.csv")
RTOL = 1e-4
STALE = "the figure is stale: run python docs/make_figure.py"


def run_demo(out: str, *, plot: bool) -> str:
    """Run the stagewise demo at its defaults into ``out``; returns the CSV's path."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    from online_llc.demos import stagewise_dln

    argv = ["--out", out] + ([] if plot else ["--no-plot"])
    with contextlib.redirect_stdout(io.StringIO()):
        rc = stagewise_dln.main(argv)
    if rc:
        raise SystemExit(f"the stagewise demo exited with status {rc}")
    return os.path.join(out, "stagewise_dln.csv")


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return math.isclose(x, y, rel_tol=RTOL, abs_tol=0.0)


def differences(fresh: str, committed: str, limit: int = 5) -> List[str]:
    """The first ``limit`` cells where the two CSVs differ beyond the tolerance."""
    with open(fresh, newline="") as fh:
        new = list(csv.reader(fh))
    with open(committed, newline="") as fh:
        old = list(csv.reader(fh))
    if new[:1] != old[:1]:
        return [f"columns differ: {old[:1]} committed, {new[:1]} now"]
    if len(new) != len(old):
        return [f"{len(old) - 1} rows committed, {len(new) - 1} now"]
    header, out = new[0], []
    for i, (r_new, r_old) in enumerate(zip(new[1:], old[1:]), start=1):
        for col, a, b in zip(header, r_new, r_old):
            if not _same(a, b):
                out.append(f"row {i}, {col}: {b} committed, {a} now")
                if len(out) >= limit:
                    return out
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and fail if the committed CSV is stale")
    args = ap.parse_args(argv)
    if args.check:
        if not os.path.isfile(CSV):
            print(f"{STALE} ({os.path.relpath(CSV)} is missing)", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory() as tmp:
            diff = differences(run_demo(tmp, plot=False), CSV)
        if diff:
            print(STALE, file=sys.stderr)
            for line in diff:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"{os.path.relpath(CSV)} is current (relative tolerance {RTOL:g})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = run_demo(tmp, plot=True)
        shutil.copyfile(fresh, CSV)
        shutil.copyfile(os.path.join(tmp, "stagewise_dln.png"), PNG)
    print(f"wrote {os.path.relpath(PNG)} and {os.path.relpath(CSV)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
