"""The ``polynet`` console script: parse the command line before importing torch.

``import polynet`` registers the models with timm, which imports torch (seconds). The command
line needs neither to print ``--help`` or to reject a bad option, so this entry point asks the
package to defer its imports (each command imports what it uses).
"""

import os
import sys


def main() -> int:
    """Run ``polynet`` with deferred package imports."""
    os.environ["POLYNET_DEFER_IMPORTS"] = "1"
    try:
        from polynet.cli import main as cli_main
    finally:
        del os.environ["POLYNET_DEFER_IMPORTS"]  # child processes import polynet normally
    return cli_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
