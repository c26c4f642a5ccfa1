"""``python -m mixlogit`` runs the command line, so ``torchrun --nproc_per_node 2 -m mixlogit fit ...`` works."""

import sys

from .cli import main

sys.exit(main())
