"""The settings of the CLI's client, the group it needs to reach the API, read from TITAN_*
once per command: where the API is, the CA an https:// API must chain to, the API key,
and the run directory by the one rule every process uses (manager.core.paths). The
client does not read the manager's other settings (it may run where they are not set, or
are not valid), nor import them: pydantic-settings alone took a CLI command 0.25 s."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from manager.core.paths import RUN_DIR


@dataclass(frozen=True)
class ClientSettings:
    run_dir: Path = RUN_DIR
    api_url: str = ""  # empty: the socket `make up`'s manager listens on
    api_ca: str = ""  # empty: run/tls/trust.crt when it exists, else the system's CAs
    api_token: str = ""  # empty: run/api.token, else compose's .env

    @classmethod
    def from_env(cls) -> ClientSettings:
        """TITAN_<FIELD> for each field; an empty value means the default, as Settings
        reads it."""
        given = {f.name: os.environ.get(f"TITAN_{f.name.upper()}", "") for f in fields(cls)}
        values: dict[str, object] = {k: v for k, v in given.items() if v}
        if "run_dir" in values:
            values["run_dir"] = Path(str(values["run_dir"]))
        return cls(**values)  # type: ignore[arg-type]

    @property
    def api(self) -> str:
        return self.api_url or f"unix://{self.run_dir / 'api.sock'}"
