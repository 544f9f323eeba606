"""`python -m bench NAME [options]`: run one benchmark; each prints its figures as a table."""

from __future__ import annotations

import sys

from bench import all as suite
from bench import decide, dryrun, population, sandbox, scale, sending, webhooks

COMMANDS = {
    "all": suite.main,
    "decide": decide.main,
    "dryrun": dryrun.main,
    "population": population.main,
    "sandbox": sandbox.main,
    "scale": scale.main,
    "sending": sending.main,
    "webhooks": webhooks.main,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m bench {{{'|'.join(COMMANDS)}}} [options]")
    COMMANDS[sys.argv[1]](sys.argv[2:])


main()
