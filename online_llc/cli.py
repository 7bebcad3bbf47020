"""The ``online-llc`` command line: run a demo, or plot a logged LLC run.

    online-llc demo stagewise --out runs/      a deep linear network learning in stages (main demo)
    online-llc demo lightning --out runs/      the Lightning callback with a CSV logger
    online-llc plot LOG [-o RUN.png]           draw the LLC band from a run's log (CSV, trainer_state.json,
                                               output_dir, TensorBoard directory)

Errors (a missing or malformed file, an unknown demo) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import List, Optional

from .demos import DEMOS

__all__ = ["main"]

_EPILOG = """examples:
  online-llc demo stagewise --out runs          train, print the live LLC, write CSV + PNG
  online-llc demo stagewise --help              the demo's own options
  online-llc plot runs/stagewise_dln.csv        draw a logged run (also Lightning's metrics.csv, a Trainer's
                                                output_dir or trainer_state.json, a TensorBoard directory)

The LLC (local learning coefficient) measures how degenerate the solution a network sits at is;
online-llc estimates it live during training with an uncertainty band."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="online-llc",
        description="Live local learning coefficient (LLC) estimates for training runs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run a demo: " + ", ".join(DEMOS),
        description="Run a demo with progress output; it writes its CSV and PNG to --out. "
        "Options after NAME go to the demo (online-llc demo NAME --help lists them).",
        add_help=True,
    )
    demo.add_argument("name", metavar="NAME", nargs="?", help="one of: " + ", ".join(DEMOS))
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help="options for the demo, e.g. --out runs --steps 20000")
    plot = sub.add_parser(
        "plot",
        help="draw the LLC band from a run's log (CSV, trainer_state.json, output_dir, TensorBoard)",
        description="Draw the LLC band (filtered mean, 90 percent band, window means coloured by status) from a run's "
        "log: a CSV written by a demo, by online_llc.plot.write_csv or by Lightning's CSVLogger; a Hugging Face "
        "trainer_state.json or output_dir; a TensorBoard event directory. Groups, when logged, get a second panel.",
    )
    plot.add_argument("csv", metavar="LOG", help="the run's log: a CSV, a trainer_state.json, an output_dir or a "
                      "TensorBoard log directory")
    plot.add_argument("-o", "--out", help="output PNG (default: next to the log, named after it)")
    plot.add_argument("--theory", type=float, help="draw a theoretical learning coefficient as a dashed line")
    plot.add_argument("--title", help="plot title (default: the run's name)")
    plot.add_argument("--loss-column", default="train_loss",
                      help="a column drawn on a second axis when present (default: train_loss, else loss)")
    return ap


def _fail(msg: str) -> int:
    print(f"online-llc: error: {msg}", file=sys.stderr)
    return 2


def _plot(args: argparse.Namespace) -> int:
    from online_llc.plot import plot_run
    from online_llc.runlogs import read_log

    if not os.path.exists(args.csv):
        return _fail(f"no such file or directory: {args.csv}")
    try:
        run = read_log(args.csv, args.loss_column)
    except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _fail(str(exc).splitlines()[0])
    if not run.history:
        return _fail(f"{args.csv}: no LLC rows")
    try:
        import matplotlib
    except ImportError:
        return _fail("plotting needs matplotlib: pip install 'online-llc[demos]'")
    matplotlib.use("Agg")
    base = args.csv.rstrip(os.sep)
    out = args.out or (os.path.join(base, "llc.png") if os.path.isdir(base) else os.path.splitext(base)[0] + ".png")
    plot_run(run, out, title=args.title, theory=args.theory)
    groups = f", {len(run.groups)} groups" if run.groups else ""
    print(f"Wrote {out} ({len(run.history)} windows{groups}, from {run.kind})")
    if run.short_run:
        print("A short run for its chains (llc/short_run): while the LLC moved, the band is mostly the chains' lag; "
              "estimate the end point with estimate_llc on the final weights.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``online-llc``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    if not argv:
        ap.print_help()
        return 0
    # `online-llc demo NAME --help` must reach the demo, not this parser.
    if argv[0] == "demo" and len(argv) >= 2 and not argv[1].startswith("-"):
        name, rest = argv[1], argv[2:]
        if name not in DEMOS:
            return _fail(f"unknown demo {name!r}; choose one of: {', '.join(DEMOS)}")
        try:
            module = importlib.import_module(DEMOS[name])
        except ImportError as exc:
            return _fail(f"demo {name!r} needs a missing package ({exc.name}): pip install 'online-llc[lightning,demos]'")
        try:
            return int(module.main(rest, prog=f"online-llc demo {name}") or 0)
        except SystemExit as exc:  # argparse inside the demo (--help, bad option)
            return int(exc.code or 0)
    args = ap.parse_args(argv)
    if args.command == "plot":
        return _plot(args)
    if args.command == "demo":  # `online-llc demo` without a name
        return _fail("missing demo NAME; choose one of: " + ", ".join(DEMOS))
    ap.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
