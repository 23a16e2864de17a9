"""The shared core that every process imports, workers included: settings, errors, Redis
keys, the Event, the run request and its record, clients, metrics, and the Celery
contract. It imports nothing else of the project."""
