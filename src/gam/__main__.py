"""``python -m gam ...`` (also what ``torchrun -m gam train ...`` runs)."""

import sys

from gam.cli import main

if __name__ == "__main__":
    sys.exit(main())
