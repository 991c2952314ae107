#!/usr/bin/env python
"""trainIdGen entry point (not implemented yet)."""

import sys

if __name__ == "__main__":
    sys.exit("trainIdGen.py: not implemented yet in this version of OFER")
