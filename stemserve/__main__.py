"""``python -m stemserve`` is the ``stemserve`` command."""
import sys

from stemserve.cli import main

sys.exit(main())
