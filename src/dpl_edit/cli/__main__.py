"""``python -m dpl_edit.cli``: the ``dpl`` command."""

import sys

from . import main

sys.exit(main())
