"""``python -m bvip_helpers`` is the same as ``bvip``."""

import sys

from bvip_helpers.cli import main

sys.exit(main())
