"""``python -m mm``: the ``mm`` command."""
import sys

from .cli import main

sys.exit(main())
