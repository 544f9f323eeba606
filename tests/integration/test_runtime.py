"""How soon a long-running process uses a newly synced definition set
(engine.runtime.Runtime.definitions): webhooks within DEFINITIONS_MAX_AGE, other callers at
once."""

from __future__ import annotations

from pathlib import Path

from engine.runtime import Runtime
from engine.settings import Settings
from engine.web.webhooks import DEFINITIONS_MAX_AGE
from tests.integration.conftest import Engage


def _edit_help_page(definitions: Path, old: str, new: str) -> None:
    program = definitions / "policies" / "program.yaml"
    program.write_text(program.read_text().replace(f"example/{old}.", f"example/{new}.", 1))


def test_webhooks_use_a_synced_set_within_a_second_and_other_callers_at_once(
    engage: Engage, settings: Settings, definitions: Path
) -> None:
    bound = DEFINITIONS_MAX_AGE  # what webhooks pass
    assert bound <= 1.0
    clock = [1000.0]
    rt = Runtime(settings, monotonic=lambda: clock[0])
    with rt.session_factory() as session:
        before = rt.definitions(session, max_age=bound)
    _edit_help_page(definitions, "sms", "sms-help")
    engage("sync")
    with rt.session_factory() as session:
        assert rt.definitions(session, max_age=bound) is before  # version read 0 s ago
        clock[0] += bound - 0.001
        assert rt.definitions(session, max_age=bound) is before
        clock[0] += 0.002  # read longer ago than the bound: read again, the new set is used
        after = rt.definitions(session, max_age=bound)
    assert after.version != before.version
    assert "sms-help" in after.program.text("help", "en")
    _edit_help_page(definitions, "sms-help", "text-help")
    engage("sync")
    with rt.session_factory() as session:  # no max_age (CLI, admin pages): read every time
        assert "text-help" in rt.definitions(session).program.text("help", "en")
        assert "text-help" in rt.definitions(session, max_age=bound).program.text("help", "en")
