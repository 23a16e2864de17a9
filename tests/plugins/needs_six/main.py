import json

import six

print(json.dumps({"topic": "test.v1", "event_type": "deps_ok",
                  "payload": {"six": six.__version__, "file": six.__file__}}))
