#!/usr/bin/env python3
"""Titan Plugin Manager CLI (also installed as `titan-plugins`)."""

from manager.cli import main

if __name__ == "__main__":
    main()
