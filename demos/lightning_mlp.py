"""Runs :mod:`online_llc.demos.lightning_mlp` (see its docstring); ``--help`` lists the options."""

import sys

from online_llc.demos.lightning_mlp import main

if __name__ == "__main__":
    sys.exit(main())
