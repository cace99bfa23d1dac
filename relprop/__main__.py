"""``python -m relprop demo`` / ``python -m relprop explain ...``: the same as the ``relprop`` command."""
import sys

from .cli import main

sys.exit(main())
