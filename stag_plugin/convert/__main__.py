"""`python -m stag_plugin.convert ...` = `stag convert ...` (the guard matters: saving a
Megatron checkpoint on the CPU starts a spawn-context helper process)."""

import sys

from stag_plugin.convert import main

if __name__ == "__main__":
    sys.exit(main())
