"""`python -m manager`: run the manager (API, bus listener, metrics)."""

from __future__ import annotations

import logging

from manager.config import Settings
from manager.service import Manager


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Manager(Settings.from_env()).serve()


if __name__ == "__main__":
    main()
