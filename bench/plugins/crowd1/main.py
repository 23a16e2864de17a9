import json
import os
import time

time.sleep(float(json.loads(os.environ["EVENT_DATA"])["payload"]["seconds"]))
print(json.dumps({"topic": "bench.v1", "event_type": "crowded", "payload": {}}))
