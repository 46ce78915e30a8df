"""``python -m speechbrain_blspkd.hearing``: run the hearing measurement
(see :mod:`speechbrain_blspkd.hearing.cli`)."""

import sys

from speechbrain_blspkd.hearing.cli import main

if __name__ == "__main__":
    sys.exit(main())
