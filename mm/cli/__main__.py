"""``python -m mm.cli`` (what ``accelerate launch -m mm.cli ...`` runs)."""
import sys

from . import main

sys.exit(main())
