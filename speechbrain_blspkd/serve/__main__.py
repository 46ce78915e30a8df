"""``python -m speechbrain_blspkd.serve``: same as ``blspkd-serve``."""

import sys

from speechbrain_blspkd.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
