"""`python -m deltakit`: the `deltakit` command (deltakit/cli.py)."""
import sys

from .cli import main

sys.exit(main())
