"""`python -m nerserve`: the `nerserve` command (cli.py)."""

import sys

from .cli import main

sys.exit(main())
