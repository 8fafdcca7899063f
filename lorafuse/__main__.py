"""``python -m lorafuse``: the same command line as ``lorafuse`` (lorafuse/cli.py)."""

from .cli import main

raise SystemExit(main())
