import json

print(json.dumps({"topic": "loop.v1", "event_type": "b", "payload": {}}))
