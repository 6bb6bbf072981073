"""``python -m benchmarks``: see ``benchmarks/report.py``."""

import sys

from .report import main

sys.exit(main())
