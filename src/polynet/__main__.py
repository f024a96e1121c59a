import sys

from polynet.cli import main

sys.exit(main())
