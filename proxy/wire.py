"""The API's wire rules, each written once: names, ids, and the bounds of what an agent sends.

The store, the HTTP layer, the OpenAPI document and the error texts all take them from
here. The agent's tools (`proxy/agent/`, standard library only, never importing this
package) keep their own copies; `tests/test_layers.py` pins those equal to these.
"""

from __future__ import annotations

import re

SECRET_NAME = r"[A-Za-z0-9_.-]{1,128}"
AGENT_NAME = r"[A-Za-z0-9_.-]{1,64}"
REQUEST_ID = r"req_[A-Za-z0-9_-]{32}"
SECRET_NAME_RE = re.compile(SECRET_NAME)
AGENT_NAME_RE = re.compile(AGENT_NAME)
REQUEST_ID_RE = re.compile(REQUEST_ID)

MAX_REASON_CHARS = 1000
MAX_WAIT_SECONDS = 60  # the longest `?wait=` of a status poll
