import sys

from heimdall.cli import main

sys.exit(main())
