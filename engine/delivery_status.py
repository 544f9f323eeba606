"""Use case for a delivery report Twilio posts to us: move the outbox row's status forward.

Nothing here commits: the caller runs it in one transaction. Error 21610 (the carrier's
own opt-out list) revokes and suppresses as the dispatcher does when a send gets it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
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
    fresh_error = report.error_code is not None and row.error_code != report.error_code
    new = advance(row.status, reported_status(report.message_status))
    if new is not None:
        row.status, row.provider_status = new, report.message_status.strip().lower()[:16]
        if row.provider_sid is None:
            row.provider_sid = report.message_sid
    if fresh_error and (new is not None or row.status in (status.UNDELIVERED, status.FAILED)):
        row.error_code = report.error_code
        said = printable(report.message_status)[:32]
        row.last_error = f"delivery report: {said} (error {report.error_code})"
    if fresh_error and report.error_code == CARRIER_OPT_OUT_CODE:
        ctx = RecordContext(worker_id="status-callback", now=now, defs=defs, keyring=keyring)
        revoke_for_carrier_opt_out(
            session=session,
            patient_id=row.patient_id,
            code=CARRIER_OPT_OUT_CODE,
            ctx=ctx,
            actor="twilio",
        )
        row.error_code = report.error_code
    session.flush()
    return "moved" if new is not None else "unchanged"


def _reported_row(session: Session, report: StatusReport) -> m.Outbox | None:
    """The row by provider sid, else by `ref` when that row holds no other sid (locked)."""
    o = m.Outbox
    lock = session.get_bind().dialect.name == "postgresql"
    stmt = select(o).where(o.provider_sid == report.message_sid)
    row = session.scalars(stmt.with_for_update() if lock else stmt).first()
    outbox_id = _outbox_id(report.ref)
    if row is not None or outbox_id is None:
        return row
    stmt = select(o).where(o.id == outbox_id)
    row = session.scalars(stmt.with_for_update() if lock else stmt).first()
    if row is None or row.provider_sid not in (None, report.message_sid):
        return None
    return row


def _outbox_id(ref: str | None) -> int | None:
    """The outbox id on the callback URL; None for anything that cannot be one."""
    return int(ref) if ref and re.fullmatch(r"[0-9]{1,18}", ref) else None
