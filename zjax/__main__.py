"""``python -m zjax``: the ``zjax`` command line."""
from zjax.cli import main

raise SystemExit(main())
