"""`python -m qualgate` runs the command line."""

from qualgate.cli import main

raise SystemExit(main())
