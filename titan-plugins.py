#!/usr/bin/env python3
"""Titan Plugin Manager CLI (also installed as `titan-plugins`). Works with any Python 3:
it re-executes itself with the project's virtualenv when needed."""

from manager.cli.bootstrap import ensure_venv

if __name__ == "__main__":
    ensure_venv()
    from manager.cli.main import main

    main()
