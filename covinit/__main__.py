"""``python -m covinit`` runs the command line (:mod:`covinit.cli`)."""

import sys

from covinit.cli import main

sys.exit(main())
