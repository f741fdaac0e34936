"""``python -m analysis``: the CkptSelect command line."""

import sys

from .cli import main

sys.exit(main())
