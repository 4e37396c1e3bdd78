"""The names under which llmproxy keeps its own objects in the ASGI scope.

Below the gate (`keys`, `app`) that writes them and the metrics (`observe`) that read
them, so neither imports the other for a string.
"""

CALLER_KEY = "llmproxy.caller"  # the authenticated `keys.Caller`, left by the gate when keys are on
METER_KEY = "llmproxy.meter"  # the request's `observe.Meter`, from the handler to the access line
