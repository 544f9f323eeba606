"""Who may do what: one matrix for the admin pages and the API (tokens carry a role too).

Every view names exactly one permission; tests walk every route against every role.
"""

from __future__ import annotations

from engine.accounts import ROLES

EVERYONE = frozenset(ROLES)
STAFF = frozenset({"marketer", "compliance", "it_admin"})

PERMISSIONS: dict[str, frozenset[str]] = {
    # Read-only views of campaigns, dashboards, decisions and definitions.
    "view": EVERYONE,
    # Marketers run campaigns; IT may stop one in an emergency.
    "campaigns.control": frozenset({"marketer", "it_admin"}),
    "campaigns.dry_run": STAFF,
    "templates.preview": STAFF,
    "templates.edit": frozenset({"marketer"}),
    # Compliance approves what marketers write (and never their own edit: engine.drafts).
    "templates.review": frozenset({"compliance"}),
    # Patient-level data: decisions per patient, consent history with evidence.
    "patients.view": frozenset({"compliance", "it_admin"}),
    "consents.record": frozenset({"compliance", "it_admin"}),
    # Data subjects' rights: the access export (GDPR Art. 15) and erasure (Art. 17, IT only).
    "patients.export": frozenset({"compliance", "it_admin"}),
    "patients.erase": frozenset({"it_admin"}),
    "policies.reload": frozenset({"it_admin"}),
    "users.manage": frozenset({"it_admin"}),
    "tokens.manage": frozenset({"it_admin"}),
    "audit.view": frozenset({"it_admin", "compliance"}),
    # The demo's phone simulator texts as a patient through the signed webhook.
    "sandbox.use": STAFF,
}


def allowed(role: str | None, permission: str) -> bool:
    return role is not None and role in PERMISSIONS[permission]
