"""``python -m ofer.train <idgen|expgen|idrank> --config FILE ...`` (see :mod:`ofer.train.entry`)."""

import sys

from .entry import main

sys.exit(main())
