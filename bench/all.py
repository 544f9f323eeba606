"""The whole benchmark suite at one scale, each part printing its own table.

    python -m bench all [--patients 1000000] [--dispatch-patients 100000]
                        [--db sqlite,postgresql] [--cache DIR] [--seconds 60]

1. `decide`: the pure core (policy decisions and renders per second, one core);
2. `scale`: one planner tick at 10,000, 100,000 and --patients patients on each database,
   against a bare bulk insert, with peak RSS and the sample re-decided the plain way;
3. `sending`: planning and dispatching --dispatch-patients patients through the twilio SDK
   to the sandbox, against bare SDK loops, and 1, 2 and 4 dispatcher processes on
   PostgreSQL;
4. `webhooks --during-dispatch`: webhook latency at 200 requests per second while
   dispatcher processes send the --patients campaign (PostgreSQL).

Seeded populations are cached (--cache, or $ENGAGE_BENCH_CACHE) so a second run at the same
scale skips seeding.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench import decide, scale, sending, webhooks


def main(argv: list[str] | None = None) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m bench all", description=__doc__,
                                     formatter_class=raw)  # fmt: skip
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--dispatch-patients", type=int, default=100_000)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=60.0, help="webhook load duration")
    args = parser.parse_args(argv)
    if args.cache is not None:
        os.environ["ENGAGE_BENCH_CACHE"] = str(args.cache)
    sizes = sorted({n for n in (10_000, 100_000, args.patients) if n <= args.patients})
    started = time.perf_counter()
    _part("decide", lambda: decide.main([]))
    scale_args = ["--patients", ",".join(map(str, sizes)), "--db", args.db]
    if args.cache is not None:
        scale_args += ["--cache", str(args.cache)]
    _part("scale", lambda: scale.main(scale_args))
    for kind in args.db.split(","):
        sending_args = ["--patients", str(args.dispatch_patients), "--db", kind]
        _part(f"sending on {kind}", lambda a=sending_args: sending.main(a))
    if "postgresql" in args.db.split(","):
        hooks = ["--during-dispatch", "--patients", str(args.patients),
                 "--seconds", str(args.seconds)]  # fmt: skip
        _part("webhooks during dispatch", lambda: webhooks.main(hooks))
    print(f"\nbench all: done in {(time.perf_counter() - started) / 60:.1f} minutes")


def _part(name: str, run: object) -> None:
    print(f"\n===== {name} =====", flush=True)
    run()  # type: ignore[operator]
