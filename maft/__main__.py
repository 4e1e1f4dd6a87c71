"""`python -m maft`: the `maft` command line."""

import sys

from .cli import main


sys.exit(main())
