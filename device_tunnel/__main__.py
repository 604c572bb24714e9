"""``python -m device_tunnel``: the same as ``proxyorch-agent``."""

import sys

from .cli import main

sys.exit(main())
