"""``python -m gam.bench <command> ...`` = ``gam bench <command> ...``."""

import sys

from gam.bench import main

sys.exit(main())
