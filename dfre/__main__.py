import sys

from dfre.cli import main

sys.exit(main())
