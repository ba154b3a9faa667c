"""``python -m pipeline.report``: see :mod:`pipeline.report.build`."""

import sys

from pipeline.report.build import main

sys.exit(main())
