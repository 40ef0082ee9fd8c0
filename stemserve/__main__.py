"""``python -m stemserve`` is the ``stemserve`` command."""
import sys

from stemserve.client.cli import main

sys.exit(main())
