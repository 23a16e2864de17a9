"""Celery workers: each run is one fresh, locked-down Docker container."""
