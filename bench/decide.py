"""The pure core alone: decisions and renders per second with the starter policy packs.

    python -m bench decide [--contexts 5000]

No database: synthetic patients, consents and histories built in memory, so the figure is
what one core spends deciding, separate from streaming and decrypting patients.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from engine.core import policy, render
from engine.core.domain import (
    ConsentState,
    DecisionContext,
    History,
    MessageFacts,
    Patient,
    SentMessage,
)
from engine.definitions import load_definitions
from engine.variables import template_variables

ROOT = Path(__file__).resolve().parents[1]
PLACES = [("America/New_York", "US", "NY"), ("America/New_York", "US", "FL"),
          ("America/Chicago", "US", "TX"), ("America/Los_Angeles", "US", "WA"),
          ("Pacific/Honolulu", "US", "HI"), ("Europe/Berlin", "DE", "BE"),
          ("Europe/Madrid", "ES", "MD")]  # fmt: skip
NOW = datetime(2026, 12, 7, 16, tzinfo=UTC)


def make_contexts(n: int, purposes: list[str], rng: random.Random) -> list[DecisionContext]:
    out = []
    for i in range(n):
        zone, country, region = rng.choice(PLACES)
        unknown = rng.random() < 0.05
        patient = Patient(
            external_id=f"P{i}", timezone=None if unknown else zone,
            candidate_timezones=("America/New_York", "America/Chicago") if unknown else (),
            locale=rng.choice(["en", "en", "es"]), country=country, region=region,
            birth_date=date(1950, 1, 1) + timedelta(days=rng.randrange(25000)),
            allow_phi_sms=rng.random() < 0.2, given_name=rng.choice(["Ana", "Zoë", "James"]),
        )  # fmt: skip
        purpose = rng.choice(["adherence", "adherence", "appointment", "marketing"])
        basis = rng.choice(["express", "written", "explicit"])
        consents = {p: ConsentState(p, active=rng.random() < 0.85, legal_basis=basis)
                    for p in purposes}  # fmt: skip
        sent = tuple(SentMessage(NOW - timedelta(hours=rng.randrange(1, 200)), rng.choice(purposes))
                     for _ in range(rng.randrange(4)))  # fmt: skip
        now = NOW + timedelta(minutes=rng.randrange(24 * 60))
        message = MessageFacts(purpose=purpose, campaign="c", template="t", length=120,
                               has_opt_out_text=True)  # fmt: skip
        out.append(DecisionContext(patient, consents, message, History(sent), now))
    return out


def rate(work, items, rounds: int = 5) -> float:  # type: ignore[no-untyped-def]
    best = 0.0
    for _ in range(rounds):
        started = time.process_time()
        for item in items:
            work(item)
        best = max(best, len(items) / (time.process_time() - started))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="decide and render throughput, no database")
    parser.add_argument("--contexts", type=int, default=5000)
    args = parser.parse_args(argv)
    defs = load_definitions(ROOT)
    purposes = list(defs.purposes)
    contexts = make_contexts(args.contexts, purposes, random.Random(7))
    outcomes = Counter(policy.decide(defs.policy_set, c).outcome for c in contexts)
    decide_rate = rate(lambda c: policy.decide(defs.policy_set, c), contexts)
    template = defs.template_for("statin-refill", "en")
    compiled = defs.compiled_templates[(template.id, template.locale)]
    program = defs.program

    def render_one(ctx: DecisionContext) -> None:
        render.render(compiled, template_variables(
            patient=ctx.patient, anchor=None, language="en", program_name=program.name,
            support_contact=program.support_contact, opt_out=program.text("opt_out", "en"),
        ))  # fmt: skip

    render_rate = rate(render_one, contexts)
    print(f"{len(defs.policy_set.rules)} starter rules, {len(contexts):,} contexts: "
          f"{dict(outcomes)}")  # fmt: skip
    print(f"\n{'measure':<20}  figure (CPU time, one core)")
    print(f"{'decide':<20}  {decide_rate:,.0f} decisions/s")
    print(f"{'render':<20}  {render_rate:,.0f} renders/s")
    both = 1 / (1 / decide_rate + 1 / render_rate)
    print(f"{'decide + render':<20}  {both:,.0f} per s")
