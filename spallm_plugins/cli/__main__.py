"""``python -m spallm_plugins.cli``: the ``spallm`` command."""

import sys

from . import main

sys.exit(main())
