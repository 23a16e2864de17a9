"""Where the project is, and its run directory's default: one rule for every process
(the manager's Settings and the CLI's client both start from here), in a module that
imports nothing, so that a CLI command does not pay for the manager's settings."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / "run"  # TITAN_RUN_DIR changes it
