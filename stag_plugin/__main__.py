"""`python -m stag_plugin <command> [flags]` = `stag <command> [flags]` (also under torchrun:
`torchrun ... -m stag_plugin train ...`). The guard matters: Megatron's checkpoint saver starts
a spawn-context process, which re-imports the main module."""

import sys

from stag_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main())
