#!/usr/bin/env python3
"""`python test_plugin_manager.py` (seed README): checks discovery of plugins/ by the rules a
reload applies (manifest, files, requirements, image). One line per plugin; exits 1 when
any plugin is invalid. A thin wrapper over `titan-plugins validate`."""

import sys

from manager.cli.bootstrap import ensure_venv

if __name__ == "__main__":
    ensure_venv()
    from manager.cli.main import main

    sys.argv[1:] = ["validate", "--all", *sys.argv[1:]]
    main()
