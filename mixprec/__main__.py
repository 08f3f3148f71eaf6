import sys

from mixprec.tools.cli import main

sys.exit(main())
