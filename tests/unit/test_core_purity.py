"""The core decides and renders with plain data: it must not pull in any edge library."""

import subprocess
import sys

EDGES = ("flask", "sqlalchemy", "twilio", "psycopg", "apscheduler", "requests")


def test_importing_the_core_loads_no_edge_library() -> None:
    probe = (
        "import sys, engine.core.domain, engine.core.policy, engine.core.policy_tests, "
        "engine.core.render, engine.core.lint, engine.core.schedule, engine.core.sms, "
        "engine.core.consent, engine.core.cel_context, engine.core.quiet_hours, "
        "engine.core.describe, engine.core.inbound\n"
        f"print(','.join(m for m in {EDGES!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
