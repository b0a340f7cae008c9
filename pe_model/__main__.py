"""``python -m pe_model ...``"""

from __future__ import annotations

import sys

from pe_model.cli import main

if __name__ == "__main__":
    sys.exit(main())
