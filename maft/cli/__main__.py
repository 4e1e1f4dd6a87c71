"""`python -m maft.cli` (as `accelerate launch -m maft.cli` runs it): the `maft` command line."""

import sys

from . import main


sys.exit(main())
