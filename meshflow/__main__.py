"""``python -m meshflow`` is the ``meshflow`` command."""

import sys

from .cli import main

sys.exit(main())
