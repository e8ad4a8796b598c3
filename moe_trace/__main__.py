import sys

from moe_trace.cli.main import main

sys.exit(main())
