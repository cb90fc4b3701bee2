"""`python -m gradtrace.cli ...` (and `torchrun ... -m gradtrace.cli -- ...`) runs the `gradtrace` command."""
import sys

from gradtrace.cli import main

sys.exit(main())
