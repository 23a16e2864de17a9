"""What a run is given beyond its sandbox, for its run alone: an egress grant (the proxy's
credentials, valid while the run lives: manager.egress.grants) and its secrets' values
(manager.core.secrets), both decided by the worker from the run request, never from the
bundle; afterwards the grant is revoked, the run's connections read from the proxy, and
every secret value masked in what the run wrote."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from manager.core.errors import SandboxUnavailable
from manager.core.groups import EgressSettings
from manager.core.observer import observer
from manager.core.records import Outcome, Status
from manager.core.run_end import RunEnd
from manager.core.runs import RunRequest
from manager.core.secrets import SecretStore
from manager.egress import grants
from manager.egress.proxy import ProxyError, Where, answers, where
from workers.engine import Engine
from workers.run_spec import RunSpec

MASK = b"[secret]"


@dataclass
class Given:
    """A run's grant and secrets while it runs; `connections` once it is over."""

    spec: RunSpec
    grant: grants.Grant | None = None
    connections: list[dict[str, Any]] = field(default_factory=list)
    proxy_lost: bool = False  # the proxy stopped answering during the run

    def ended(self, outcome: Outcome) -> Outcome:
        """The outcome with the run's connections, and why a failed run may have failed
        when its proxy went away under it."""
        if self.grant is None:
            return outcome
        reason = outcome.reason
        if self.proxy_lost and outcome.status is not Status.SUCCEEDED:
            reason = (f"{reason}; the egress proxy stopped answering during the run (make "
                      "up starts it again)")
        return replace(outcome, reason=reason, egress=tuple(self.connections))

    def masked(self, end: RunEnd) -> RunEnd:
        """The run's output with every secret value replaced (also as JSON escapes it)."""
        if not self.spec.secrets:
            return end
        return replace(end, stdout=mask(end.stdout, self.spec.secrets),
                       stderr=mask(end.stderr, self.spec.secrets))


def mask(data: bytes, secrets: tuple[tuple[str, bytes], ...]) -> bytes:
    forms = set()
    for _, value in secrets:
        forms.add(value)
        with contextlib.suppress(UnicodeDecodeError):
            forms.add(json.dumps(value.decode())[1:-1].encode())
    for form in sorted((f for f in forms if f), key=len, reverse=True):
        data = data.replace(form, MASK)
    return data


class Gate:
    """Per worker process: where the egress proxy is (asked of the engine once) and the
    secret store."""

    def __init__(self, egress: EgressSettings, engine: Engine, secrets: SecretStore) -> None:
        self.egress = egress
        self.engine = engine
        self.secrets = secrets
        self._proxy: Where | None = None

    def proxy(self) -> Where:
        """The proxy's address; raises SandboxUnavailable when it does not answer (the
        run waits for it like for an engine that does not answer)."""
        try:
            if self._proxy is None:
                self._proxy = where(self.engine.client, self.egress)
        except ProxyError as exc:
            raise SandboxUnavailable(exc.args[0]) from exc
        if not answers(self._proxy):
            found, self._proxy = self._proxy, None
            raise SandboxUnavailable(f"the egress proxy does not answer at {found.gateway}:"
                                     f"{found.port}; make up starts it")
        return found if self._proxy is None else self._proxy

    @contextlib.contextmanager
    def given(self, req: RunRequest, spec: RunSpec) -> Iterator[Given]:
        """The run's spec with its secrets and proxy credentials. Raises SecretError
        (the run fails, the fix named) or SandboxUnavailable (no proxy answers)."""
        values = tuple(self.secrets.values_for(req.plugin, req.secrets))
        spec = replace(spec, secrets=values)
        if not req.net_allow:
            yield Given(spec)
            return
        grant = grants.issue(self.egress, self.proxy(), req.invocation_id, req.plugin,
                             req.net_allow, spec.timeout)
        given = Given(replace(spec, proxy_env=tuple(grant.env.items()),
                              grant_file=str(grant.grant_file)), grant)
        try:
            yield given
        finally:
            grants.revoke(grant)
            given.connections = grants.connections(grant)
            given.proxy_lost = not answers(grant.proxy)
            observer().egress(req.plugin, given.connections)
