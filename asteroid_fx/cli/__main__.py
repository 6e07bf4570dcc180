"""python -m asteroid_fx.cli: the `asteroid` command."""

import sys

from asteroid_fx.cli import main

sys.exit(main())
