"""``python -m gam.bench <command> ...`` = ``gam bench <command> ...``."""

import sys

from gam.bench import main
from gam.errors import ignore_file_size_signal, run_reporting_errors

ignore_file_size_signal()
sys.exit(run_reporting_errors("gam bench", main))
