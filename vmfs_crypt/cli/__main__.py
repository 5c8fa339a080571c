"""`python -m vmfs_crypt.cli`: the vmfs-crypt command."""

import sys

from . import main

sys.exit(main())
