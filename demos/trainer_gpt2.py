"""Runs :mod:`online_llc.demos.trainer_gpt2` (see its docstring); ``--help`` lists the options."""

import sys

from online_llc.demos.trainer_gpt2 import main

if __name__ == "__main__":
    sys.exit(main())
