"""``python -m pacofr`` runs the command line (see :mod:`pacofr.cli`)."""

import sys

from pacofr.cli import main

sys.exit(main())
