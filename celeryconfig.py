"""Celery's own configuration. The broker URL, queue and visibility timeout come from
manager.core.config.Settings, added by manager.core.contract.make_celery (nothing is read
here)."""

task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# A run is acknowledged only after its outcome is stored. The task never lets a Redis
# error count as "finished": it keeps the outcome and retries until Redis answers, and
# past its budget it rejects the message with requeue, so the run comes back.
task_acks_late = True
task_reject_on_worker_lost = True
# A run that failed is told to Flower as a failure after its outcome is stored, and is
# acknowledged like any finished run (it has its record and its failure event).
task_acks_on_failure = True
task_acks_on_timeout = True
worker_prefetch_multiplier = 1
# Runs in flight finish when the broker connection drops; their outcome is stored when
# Redis is back, and an acknowledgement lost with the old connection only costs a
# redelivery that finds the run finished.
worker_cancel_long_running_tasks_on_connection_loss = False
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

# Events for Flower: runs appear under their plugin name (the task's shadow name). No
# task-sent events: sent by the dispatcher with the plain task name, they could arrive
# after the worker's and overwrite that name.
worker_send_task_events = True
task_send_sent_event = False
worker_hijack_root_logger = False
worker_redirect_stdouts = False
