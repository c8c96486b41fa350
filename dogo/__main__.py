import sys

from dogo.cli import main

sys.exit(main())
