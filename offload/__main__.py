import sys

from offload.commands.cli import main

sys.exit(main())
