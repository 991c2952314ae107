"""``python -m ofer.world``: build a synthetic world (see :mod:`ofer.world.build`)."""

import sys

from .build import main

sys.exit(main())
