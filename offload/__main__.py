import sys

from offload.commands.entry import main

sys.exit(main())
