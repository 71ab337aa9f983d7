"""``python -m sqlalchemy_replicas``: the command line."""

import sys

from .cli import main

sys.exit(main())
