"""Celery's configuration. The broker URL and queue come from manager.config.Settings."""

from manager.config import Settings

_settings = Settings.from_env()

broker_url = _settings.redis_url
task_default_queue = _settings.task_queue
task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# A run is acknowledged only after it finished; a worker that dies mid-run gives it back.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Unacknowledged tasks come back after this long: longer than the longest allowed run.
_restore_every = max(1, min(10, _settings.restore_interval))
broker_transport_options = {
    "visibility_timeout": _settings.effective_visibility_timeout,
    # kombu scans for unacknowledged tasks about every interval * throttle seconds.
    "unacked_restore_interval": _restore_every,
    "unacked_restore_throttle": max(1, _settings.restore_interval // _restore_every),
    "socket_keepalive": True,
    "retry_on_timeout": True,
}
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

# Events for Flower (runs appear under their plugin name via the task's shadow name).
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False
worker_redirect_stdouts = False
