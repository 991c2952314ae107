#!/usr/bin/env python
"""trainIdRank entry point (not implemented yet)."""

import sys

if __name__ == "__main__":
    sys.exit("trainIdRank.py: not implemented yet in this version of OFER")
