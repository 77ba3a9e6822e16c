"""`python -m fastmask ...` is `fastmask ...`."""

import sys

from .cli import main

sys.exit(main())
