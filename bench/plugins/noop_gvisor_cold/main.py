print('{"topic": "bench.v1", "event_type": "tock", "payload": {}}')
