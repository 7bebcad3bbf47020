"""Runs :mod:`online_llc.demos.probes_dln` (see its docstring); ``--help`` lists the options."""

import sys

from online_llc.demos.probes_dln import main

if __name__ == "__main__":
    sys.exit(main())
