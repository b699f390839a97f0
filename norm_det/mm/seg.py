"""``python -m norm_det.mm.seg train|test CONFIG ...``: :mod:`norm_det.mm` for an mmseg config."""

import sys

from norm_det.mm.cli import main

if __name__ == "__main__":
    sys.exit(main(framework="mmseg"))
