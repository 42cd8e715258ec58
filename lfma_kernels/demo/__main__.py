"""``python -m lfma_kernels.demo``: the demo's command line (``lfma-demo``)."""
import sys

from .study import main

sys.exit(main())
