import sys

from pyft.cli import main

sys.exit(main())
