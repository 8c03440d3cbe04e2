"""``python -m fastunet``: the same as the ``fastunet`` command (see ``fastunet.cli``)."""

import sys

from .cli import main

sys.exit(main())
