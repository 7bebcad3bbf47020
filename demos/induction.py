"""Runs :mod:`online_llc.demos.induction` (see its docstring); ``--help`` lists the options."""

import sys

from online_llc.demos.induction import main

if __name__ == "__main__":
    sys.exit(main())
