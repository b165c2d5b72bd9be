"""``python -m lift_ds.analysis``."""

import sys

from .cli import main

sys.exit(main())
