"""The sandbox's own endpoints (not Twilio's): what was sent, reset, and fault settings.

GET    /sandbox/messages.json   every accepted message, oldest first (?to=, ?status=),
                                with create-request counts per To number
DELETE /sandbox/messages        forget every message and count
GET    /sandbox/faults          the fault settings in force (FaultConfig JSON)
POST   /sandbox/faults          replace them (JSON body; keys left out take defaults)
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from engine.sandbox.api import current_sandbox, json_response
from engine.sandbox.config import FaultConfig, FaultConfigError
from engine.sandbox.store import MessageFilter, message_json, utcnow

bp = Blueprint("sandbox_control", __name__, url_prefix="/sandbox")


@bp.get("/messages.json")
def messages() -> Response:
    sandbox = current_sandbox()
    now = utcnow()
    chosen = sandbox.store.select(MessageFilter(to=request.args.get("to") or None), now)
    chosen.reverse()
    status = request.args.get("status")
    listed = []
    for m in chosen:
        data = message_json(m, now)
        if status and data["status"] != status:
            continue
        data["status_callback"] = m.status_callback
        listed.append(data)
    return json_response(
        {
            "messages": listed,
            **sandbox.store.counts(),
            "callbacks": {"posted": sandbox.callbacks.posted, "dropped": sandbox.callbacks.dropped},
        }
    )


@bp.delete("/messages")
def reset() -> Response:
    current_sandbox().reset()
    return Response(status=204)


@bp.get("/faults")
def faults() -> Response:
    return json_response(current_sandbox().faults.config.to_dict())


@bp.post("/faults")
def set_faults() -> Response:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        return json_response({"error": "expected a JSON object of fault settings"}, 400)
    try:
        config = FaultConfig.from_dict(data)
    except FaultConfigError as exc:
        return json_response({"error": str(exc)}, 400)
    current_sandbox().faults.configure(config)
    return json_response(config.to_dict())
