"""A local Twilio-compatible Messages API: the `sandbox` transport's provider, for the demo
and the tests. It records every message, sends signed status callbacks, injects faults, and
plays the patients' phones (their replies reach the app as signed webhooks).

    config.py     SandboxConfig, FaultConfig (the JSON of POST /sandbox/faults)
    server.py     create_sandbox_app(config), SandboxServer (threaded werkzeug, background)
    keepalive.py  the werkzeug request handler with HTTP/1.1 keep-alive
    api.py        Twilio's /2010-04-01/Accounts/{sid}/Messages endpoints
    control.py    /sandbox/messages.json, /sandbox/faults
    phone_api.py  /sandbox/phones: what each phone received, and texts it sends back
    phones.py     the phones: read marks, signed webhook POSTs of their texts, TwiML replies
    service.py    authenticate, validate, accept (no HTTP)
    store.py      messages, status timelines, Twilio's JSON shape
    faults.py     the seedable fault draws
    callbacks.py  signed status callbacks from background threads
    client.py     SandboxClient for the control endpoints
"""

from engine.sandbox.config import (
    SANDBOX_ACCOUNT_SID,
    SANDBOX_AUTH_TOKEN,
    SANDBOX_FROM_NUMBER,
    FaultConfig,
    SandboxConfig,
)

__all__ = [
    "SANDBOX_ACCOUNT_SID",
    "SANDBOX_AUTH_TOKEN",
    "SANDBOX_FROM_NUMBER",
    "FaultConfig",
    "SandboxConfig",
]
