"""``python -m ztunnel``: run the node proxy."""

import sys

from ztunnel.main import main

sys.exit(main())
