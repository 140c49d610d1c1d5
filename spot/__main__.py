"""`python -m spot`: the command-line tools (spot/tools/cli.py)."""

import sys

from spot.tools.cli import main

sys.exit(main())
