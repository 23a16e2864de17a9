import json
import os
import time

event = json.loads(os.environ["EVENT_DATA"])
time.sleep(float(event["payload"].get("seconds", 3)))
print(json.dumps({"topic": "test.v1", "event_type": "slept", "payload": {}}))
