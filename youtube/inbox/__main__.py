"""`python -m youtube.inbox`: the command line in cli.py."""

import sys

from youtube.inbox.cli import main

sys.exit(main())
