"""``python -m norm_det.mm train|test|synthetic ...``."""

import sys

from norm_det.mm.cli import main

sys.exit(main())
