"""``python -m harden`` is the ``harden`` command."""

from harden.cli import main

raise SystemExit(main())
