"""The settings of the CLI's client, the group it needs to reach the API, read from TITAN_*
once per command: where the API is, the CA an https:// API must chain to, the API key,
and the run directory by the one rule every process uses (Settings.run_dir). The client
does not read the manager's other settings (it may run where they are not set, or are
not valid)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from manager.core.config import Settings


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TITAN_", env_ignore_empty=True,
                                      frozen=True, extra="ignore")

    run_dir: Path = Settings.model_fields["run_dir"].default
    api_url: str = ""  # empty: the socket `make up`'s manager listens on
    api_ca: str = ""  # empty: run/tls/trust.crt when it exists, else the system's CAs
    api_token: str = ""  # empty: run/api.token, else compose's .env

    @property
    def api(self) -> str:
        return self.api_url or f"unix://{self.run_dir / 'api.sock'}"
