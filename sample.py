#!/usr/bin/env python
"""Sample OFER reconstructions for a folder of images.

    python sample.py --input DIR_OR_FILE --output DIR [--config configs/sample.yaml] [key=value ...]
    torchrun --nproc_per_node=K sample.py ...      # shard the images across processes / GPUs

See ``ofer.sample`` and the README for the outputs.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from ofer.sample.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
