"""``python -m boxdisk``: the same as the ``boxdisk`` command."""

import sys

from .cli import main

sys.exit(main())
