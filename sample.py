#!/usr/bin/env python
"""sample entry point (not implemented yet)."""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: not implemented yet in this version of OFER")
