"""Lets the top-level scripts run with any Python 3 on the machine: when the project's
dependencies are not importable, re-execute with the virtualenv `make up` made.
Standard library only: this runs before any dependency is imported."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("click", "redis", "yaml", "pydantic", "packaging")


def ensure_venv() -> None:
    if all(importlib.util.find_spec(m) is not None for m in NEEDED):
        return
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        sys.stderr.write("error: the project's dependencies are not installed; run: make up\n")
        raise SystemExit(2)
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        sys.stderr.write(f"error: {venv_python} lacks the project's dependencies; run: make up\n")
        raise SystemExit(2)
    os.execv(str(venv_python), [str(venv_python), *sys.argv])
