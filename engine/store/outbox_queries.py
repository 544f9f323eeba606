"""Outbox reads shared by the planner and the dispatcher (keyword-only)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.core.domain import History, SentMessage
from engine.outbox_status import COUNTS_AS_SENT
from engine.store import models as m
from engine.store.queries import id_groups

HISTORY_WINDOW = timedelta(days=7)


def histories_for(
    *,
    session: Session,
    patient_ids: Iterable[int],
    now: datetime,
    window: timedelta = HISTORY_WINDOW,
) -> dict[int, History]:
    """Messages sent or committed to be sent to each patient in the window before `now`.

    A row counts from its sent_at, or, while it is being sent, from its claim time.
    """
    o = m.Outbox
    sent: dict[int, list[SentMessage]] = defaultdict(list)
    ids = list(patient_ids)
    since = now - window
    for criterion, wanted in id_groups(o.patient_id, ids):
        stmt = select(o.patient_id, o.purpose, o.sent_at, o.claimed_at).where(
            criterion, o.status.in_(COUNTS_AS_SENT)
        )
        for pid, purpose, sent_at, claimed_at in session.execute(stmt):
            at = sent_at or claimed_at
            if pid in wanted and at is not None and at > since:
                sent[pid].append(SentMessage(at, purpose))
    return {pid: History(tuple(sorted(sent.get(pid, ()), key=lambda s: s.at))) for pid in ids}
