#!/usr/bin/env python
"""trainExpGen entry point (not implemented yet)."""

import sys

if __name__ == "__main__":
    sys.exit("trainExpGen.py: not implemented yet in this version of OFER")
