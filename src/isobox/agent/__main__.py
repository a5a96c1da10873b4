"""``python3 -m isobox.agent``: the utility VM's stage 2 starts the guest agent this way.

The import is dynamic on purpose: this file belongs to the package's own row (its
``__init__``), which imports nothing from the rows above; the agent is row 3.
"""

import importlib
import sys

sys.exit(importlib.import_module("isobox.agent.guest").main())
