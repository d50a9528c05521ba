"""``python -m dpl_edit.cli``: the ``dpl`` command."""

import sys

from . import console

sys.exit(console())
