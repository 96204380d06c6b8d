#!/usr/bin/env python3
"""The seed guide's compatibility check: an alias of `python -m qvl_core.doctor`."""
import sys

from qvl_core.doctor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
