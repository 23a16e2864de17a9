import json

for n in range(3):
    print(json.dumps({"topic": "fanout.v1", "event_type": "spawn", "payload": {"n": n}}))
