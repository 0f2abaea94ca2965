"""``python -m waypoint``: run the waypoint proxy (see ``waypoint.main``)."""

import sys

from waypoint.main import main

sys.exit(main())
