"""``python -m benchmarks`` is ``python -m benchmarks.run_all``."""
import sys

from .run_all import main

sys.exit(main())
