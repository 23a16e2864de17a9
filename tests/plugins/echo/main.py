import json
import os

event = json.loads(os.environ["EVENT_DATA"])
with open(os.environ["EVENT_FILE"], encoding="utf-8") as fh:
    same = json.load(fh) == event
print(json.dumps({"topic": "test.v1", "event_type": "pong",
                  "payload": {"echo": event["payload"], "event_file_matches": same,
                              "plugin": os.environ["PLUGIN_NAME"],
                              "version": os.environ["PLUGIN_VERSION"],
                              "invocation_id": os.environ["INVOCATION_ID"]}}))
