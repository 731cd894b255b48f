"""``python -m transferlab``: the ``transferlab`` command."""

import sys

from transferlab.launcher import main

sys.exit(main())
