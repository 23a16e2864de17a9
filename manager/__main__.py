"""`python -m manager`: run the manager (API, bus listener, metrics)."""

from __future__ import annotations

import argparse
import logging

from manager.core.config import Settings
from manager.core.errors import TitanError
from manager.service import Manager


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m manager", description=__doc__)
    parser.add_argument("--watch", action="store_true",
                        help="reload plugins when files under the plugins directory change")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manager = Manager(Settings.from_env())
    except TitanError as exc:
        parser.exit(2, f"error: {exc.message}\n")
    except ValueError as exc:  # a setting (TITAN_*) with a value it cannot have
        parser.exit(2, f"error: {exc}\n")
    manager.serve(watch=args.watch)


if __name__ == "__main__":
    main()
