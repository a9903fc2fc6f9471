"""`python -m weightsync_cli ...` runs the `weightsync` command."""

import sys

from weightsync_cli.main import main

sys.exit(main())
