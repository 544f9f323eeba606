"""Named points where the fault-injection tests make a worker die, at a chosen moment.

`ENGAGE_FAILPOINTS="name:nth[:action],..."` arms points for one process: the nth time
`hit(name)` runs in it, the action happens.

    kill   SIGKILL to itself (the default): a crash, the OOM killer, a pulled plug
    term   SIGTERM to itself: a graceful stop requested at exactly that point

Before it acts, a point writes one JSON line to stderr (`{"event": "failpoint", ...}`) so
a test can tell which point fired. Unset (production), `hit` costs one global lookup:
the variable is read once, on the first hit, never at import.

Points are named `<module>.<moment>` after where they sit in the sending path
(`claim.after_commit`, `send.after_call`, `record.after_accepted`, ...); the list and
what each one proves is in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import threading

ENV = "ENGAGE_FAILPOINTS"
ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


class FailpointError(ValueError):
    """ENGAGE_FAILPOINTS cannot be read."""


_armed: dict[str, tuple[int, str]] | None = None  # name -> (nth, action); None: not read yet
_hits: dict[str, int] = {}
_lock = threading.Lock()


def parse(text: str) -> dict[str, tuple[int, str]]:
    """`name:nth[:action],...` -> {name: (nth, action)}."""
    armed: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        nth_text, _, action = rest.partition(":")
        action = action or "kill"
        if not name or not nth_text.isdigit() or int(nth_text) < 1 or action not in ACTIONS:
            raise FailpointError(f"{ENV}: {item!r} is not name:nth[:kill|term] with nth >= 1")
        armed[name] = (int(nth_text), action)
    return armed


def hit(name: str) -> None:
    """Count a pass through the point `name`; act when it is armed for this pass."""
    armed = _armed if _armed is not None else _load()
    if not armed or name not in armed:
        return
    nth, action = armed[name]
    with _lock:
        count = _hits[name] = _hits.get(name, 0) + 1
    if count != nth:
        return
    line = {"event": "failpoint", "name": name, "hit": count, "action": action}
    os.write(2, (json.dumps(line) + "\n").encode())
    os.kill(os.getpid(), ACTIONS[action])


def _load() -> dict[str, tuple[int, str]]:
    global _armed
    with _lock:
        if _armed is None:
            _armed = parse(os.environ.get(ENV, ""))
        return _armed


def reset(text: str | None = None) -> None:
    """Arm from `text` instead of the environment (None: read it again); counts restart."""
    global _armed
    with _lock:
        _armed = None if text is None else parse(text)
        _hits.clear()
