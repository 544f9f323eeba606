"""Use case for a delivery report Twilio posts to us: move the outbox row's status forward.

Nothing here commits: the caller runs it in one transaction. Error 21610 (the carrier's
own opt-out list) revokes and suppresses as the dispatcher does when a send gets it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.orm import Session

from engine import outbox_status as status
from engine.core.inbound import advance, reported_status
from engine.crypto import Keyring
from engine.definitions import DefinitionSet
from engine.dispatch_record import RecordContext, revoke_for_carrier_opt_out
from engine.inbound import printable
from engine.store import models as m

log = logging.getLogger("engine.inbound")

CARRIER_OPT_OUT_CODE = 21610  # Twilio: "Attempt to send to unsubscribed recipient"


@dataclass(frozen=True)
class StatusReport:
    message_sid: str
    message_status: str
    error_code: int | None = None
    ref: str | None = None  # the outbox id the twilio transport put on the callback URL


def handle_status(
    *, session: Session, keyring: Keyring, defs: DefinitionSet, report: StatusReport, now: datetime
) -> str:
    """Move the row's status forward only; 21610 revokes and suppresses as the dispatcher does.

    Returns what happened: unknown-message, moved, unchanged.
    """
    row = _reported_row(session, report)
    if row is None:
        log.info("inbound.status_unknown", extra={"fields": {"sid": report.message_sid}})
        return "unknown-message"
    changes = _changes(row, report)
    if report.error_code == CARRIER_OPT_OUT_CODE and row.error_code != CARRIER_OPT_OUT_CODE:
        ctx = RecordContext(worker_id="status-callback", now=now, defs=defs, keyring=keyring)
        revoke_for_carrier_opt_out(
            session=session,
            patient_id=row.patient_id,
            code=CARRIER_OPT_OUT_CODE,
            ctx=ctx,
            actor="twilio",
        )
        changes["error_code"] = CARRIER_OPT_OUT_CODE
    if changes:
        session.execute(_UPDATE, {"outbox_id": row.id, **changes})
    return "moved" if "status" in changes else "unchanged"


def _changes(row: Row[Any], report: StatusReport) -> dict[str, Any]:
    """The columns the report changes: the status, forward only, and a new error code on a
    row it moves or that has failed."""
    changes: dict[str, Any] = {}
    new = advance(row.status, reported_status(report.message_status))
    if new is not None:
        changes["status"] = new
        changes["provider_status"] = report.message_status.strip().lower()[:16]
        if row.provider_sid is None:
            changes["provider_sid"] = report.message_sid
    fresh_error = report.error_code is not None and row.error_code != report.error_code
    if fresh_error and (new is not None or row.status in (status.UNDELIVERED, status.FAILED)):
        said = printable(report.message_status)[:32]
        changes["error_code"] = report.error_code
        changes["last_error"] = f"delivery report: {said} (error {report.error_code})"
    return changes


# Built once: Core, and only the columns a report reads (a whole ORM outbox row cost several
# times more to fetch and load). SQLite compiles FOR UPDATE to nothing: its write
# transactions are serialised (BEGIN IMMEDIATE) instead.
_OUTBOX = m.Outbox.__table__
_COLUMNS = (_OUTBOX.c.id, _OUTBOX.c.status, _OUTBOX.c.provider_sid, _OUTBOX.c.error_code,
            _OUTBOX.c.patient_id)  # fmt: skip
_BY_SID = select(*_COLUMNS).where(_OUTBOX.c.provider_sid == bindparam("sid")).with_for_update()
_BY_ID = select(*_COLUMNS).where(_OUTBOX.c.id == bindparam("outbox_id")).with_for_update()
# The SET clause is the columns given at execution.
_UPDATE = update(_OUTBOX).where(_OUTBOX.c.id == bindparam("outbox_id"))


def _reported_row(session: Session, report: StatusReport) -> Row[Any] | None:
    """The row by provider sid, else by `ref` when that row holds no other sid (locked)."""
    row = session.execute(_BY_SID, {"sid": report.message_sid}).first()
    outbox_id = _outbox_id(report.ref)
    if row is not None or outbox_id is None:
        return row
    row = session.execute(_BY_ID, {"outbox_id": outbox_id}).first()
    if row is None or row.provider_sid not in (None, report.message_sid):
        return None
    return row


def _outbox_id(ref: str | None) -> int | None:
    """The outbox id on the callback URL; None for anything that cannot be one."""
    return int(ref) if ref and re.fullmatch(r"[0-9]{1,18}", ref) else None
