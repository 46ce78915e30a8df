"""``python -m speechbrain_blspkd.inference.demo_ui``: the demo command."""

import sys

from speechbrain_blspkd.inference.demo_ui.cli import main

sys.exit(main())
