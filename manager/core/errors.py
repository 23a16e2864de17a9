"""One error tree for the project; every error carries the context to act on it. Errors
cross the API as `to_dict()`, in answers that carry API_HEADER."""

from __future__ import annotations

from typing import Any

API_HEADER = "X-Titan-Api"  # on every answer of the API: how the CLI knows the API answered


class TitanError(Exception):
    """Base class. `code` is stable and machine-readable; `details` names the culprit."""

    code = "titan_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class EventError(TitanError):
    """An event broke SPEC §2; `details["field"]` names the field."""

    code = "invalid_event"


class ManifestError(TitanError):
    """A plugin.yaml broke SPEC §3; `details["errors"]` lists each field's problem."""

    code = "invalid_manifest"

    def __init__(self, message: str, path: str, errors: list[str]) -> None:
        super().__init__(message, path=path, errors=errors)
        self.path = path
        self.errors = errors


class BudgetExceeded(TitanError):
    """A correlation id used its fan-out budget (TITAN_FANOUT_BUDGET runs)."""

    code = "budget_exceeded"


class PluginNotFound(TitanError):
    code = "plugin_not_found"


class VersionNotFound(TitanError):
    code = "version_not_found"


class PluginUnavailable(TitanError):
    """The plugin exists but cannot run (invalid, or its bundle is missing)."""

    code = "plugin_unavailable"


class PermissionDenied(TitanError):
    """An event asked for a host path the plugin may not read."""

    code = "permission_denied"


class SandboxUnavailable(TitanError):
    """The Docker engine or the runtime image cannot be used; the run may be retried."""

    code = "sandbox_unavailable"


class ContainerRefused(TitanError):
    """The engine will not run this container (its image is absent, or it refused the
    options): the run ends `failed` with the reason; retrying cannot help."""

    code = "container_refused"


class BundleError(TitanError):
    """A plugin bundle is missing or does not match its digest."""

    code = "bundle_error"


class DependencyError(TitanError):
    """A plugin's requirements.txt could not be installed."""

    code = "requirements_failed"


class InvocationNotFound(TitanError):
    code = "invocation_not_found"


class DeadLetterNotFound(TitanError):
    code = "dead_letter_not_found"


class BadQuery(TitanError):
    """A query parameter that is not what the endpoint takes; `details["field"]`."""

    code = "invalid_query"


class NotReplicated(TitanError):
    """A write was stored on the primary but not confirmed by enough replicas in time
    (TITAN_REDIS_MIN_REPLICAS, TITAN_REDIS_WAIT_MS): a failover now could lose it."""

    code = "not_replicated"


class OutcomeNotStored(TitanError):
    """A finished run's outcome could not be stored within the budget (Redis away); the
    task message goes back so the run comes back."""

    code = "outcome_not_stored"
