"""`python -m totalseg_fast ...`: the same command as `.venv/bin/totalseg_fast`."""
import sys

from totalseg_fast.cli import main

sys.exit(main())
