"""The IT pages of the admin app on SQLite and PostgreSQL: the policy set and its reload
(a broken file changes nothing and names file and line; a good change activates), purposes
and data classification, users, API tokens (secret shown once, only its hash stored) and the
audit log with its chain check."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from sqlalchemy import select, update

from engine import accounts, audit
from engine.settings import Settings
from engine.store import models as m
from engine.store.defqueries import active_version
from tests.integration.admin_fixtures import CSRF, PASSWORD, sign_in
from tests.integration.conftest import Engage
from tests.integration.test_admin_compliance import NOW, Site, audit_actions, prepare_site
from tests.integration.test_audit import tampering

TCPA = "policies/tcpa.yaml"


@pytest.fixture
def site(engage: Engage, settings: Settings, definitions: Path) -> Site:
    return prepare_site(engage, settings, definitions)


def _text(response: object) -> str:
    return html.unescape(response.get_data(as_text=True))  # type: ignore[attr-defined]


def _active(site: Site) -> str | None:
    with site.runtime.session_factory() as session:
        return active_version(session=session)


def _edit(definitions: Path, old: str, new: str) -> None:
    path = definitions / TCPA
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_the_policy_page_lists_packs_rules_citations_and_test_results(site: Site) -> None:
    viewer = sign_in(site.app, "viewer-1")
    page = _text(viewer.get("/admin/policies"))
    assert f'id="active-version">{_active(site)}<' in page
    assert "tcpa-quiet-hours" in page and "47 CFR 64.1200(c)(1)" in page
    assert "send between 08:00 and 21:00 local time" in page
    assert "tests pass" in page and "tests fail" not in page
    assert "07:00 in Los Angeles is deferred" in page
    assert TCPA in page and "Reload from folders" not in page  # viewers may not reload
    assert viewer.post("/admin/policies/reload", {"reload": "1"}).status_code == 403
    data = _text(viewer.get("/admin/policies/data"))
    assert "adherence" in data and "marketing" in data
    assert '<code>refill_due</code></td><td><span class="badge c-phi">phi</span>' in data
    assert '<code>given_name</code></td><td><span class="badge c-pii">pii</span>' in data


def test_a_broken_policy_file_reloads_nothing_and_a_good_change_activates(
    site: Site, definitions: Path
) -> None:
    before = _active(site)
    it = sign_in(site.app, "it-admin-1")
    assert "Reload from folders" in _text(it.get("/admin/policies"))
    _edit(
        definitions,
        '    window: {start: "08:00", end: "21:00"}\n    effect: defer',
        '    window: {start: "08:00", end: "21:00"}\n    effect: later',
    )
    broken = it.post("/admin/policies/reload", {"reload": "1"})
    page = _text(broken)
    assert broken.status_code == 400
    assert f"<li>{TCPA}:13: rules.0.effect: Input should be 'deny' or 'defer'</li>" in page
    assert f'id="active-version">{before}<' in page and _active(site) == before

    _edit(definitions, "effect: later", "effect: defer")
    _edit(definitions, 'end: "21:00"', 'end: "20:30"')
    reloaded = it.post("/admin/policies/reload", {"reload": "1"})
    page = _text(reloaded)
    after = _active(site)
    assert reloaded.status_code == 200 and after != before
    assert f"changed: {TCPA}" in page and f"(were <code>{before}</code>)" in page
    assert "send between 08:00 and 20:30 local time" in page
    again = _text(it.post("/admin/policies/reload", {"reload": "1"}))
    assert "Nothing changed" in again and _active(site) == after
    entries = [e for e in audit_actions(site.runtime) if e[1].startswith("definitions_reload")]
    assert [e[1] for e in entries] == [
        "definitions_reload_failed",
        "definitions_reloaded",
        "definitions_reloaded",
    ]
    assert entries[0][3] == {"errors": 1, "files": [TCPA]}
    assert entries[1][3]["changed"] == [TCPA] and entries[1][3]["previous"] == before


def test_users_are_created_disabled_enabled_and_reset_with_errors_next_to_fields(
    site: Site,
) -> None:
    assert sign_in(site.app, "compliance-1").get("/admin/users").status_code == 403
    it = sign_in(site.app, "it-admin-1")
    short = it.post("/admin/users", {"username": "dana", "role": "compliance", "password": "short"})
    assert short.status_code == 400
    assert 'id="password-error">use at least 12 characters' in _text(short)
    taken = it.post(
        "/admin/users", {"username": "viewer-1", "role": "viewer", "password": PASSWORD}
    )
    assert taken.status_code == 400 and "already exists" in _text(taken)
    created = it.post(
        "/admin/users", {"username": "Dana", "role": "compliance", "password": PASSWORD}
    )
    assert created.status_code == 303
    assert "Created dana (Compliance reviewer)" in _text(it.get("/admin/users"))
    dana = sign_in(site.app, "dana")
    assert dana.get("/admin/approvals").status_code == 200

    with site.runtime.session_factory() as session:
        ids = dict(session.execute(select(m.User.username, m.User.id)).all())
    assert it.post(f"/admin/users/{ids['dana']}/disable").status_code == 303
    assert dana.get("/admin/approvals").status_code == 302  # signed out at once
    assert _login(site, "dana", PASSWORD) == 401
    own = it.post(f"/admin/users/{ids['it-admin-1']}/disable")
    assert own.status_code == 400 and "cannot disable your own account" in _text(own)
    assert it.post(f"/admin/users/{ids['dana']}/enable").status_code == 303
    mismatch = it.post(
        f"/admin/users/{ids['dana']}/password", {"password": "x" * 14, "confirm": "y" * 14}
    )
    assert mismatch.status_code == 400 and "the two passwords differ" in _text(mismatch)
    new_password = "a brand new passphrase"
    reset = it.post(
        f"/admin/users/{ids['dana']}/password", {"password": new_password, "confirm": new_password}
    )
    assert reset.status_code == 303
    assert _login(site, "dana", PASSWORD) == 401 and _login(site, "dana", new_password) == 302
    with site.runtime.session_factory() as session:
        me = session.get_one(m.User, ids["it-admin-1"])
        assert not me.disabled
    actions = [
        (a, s) for actor, a, s, _ in audit_actions(site.runtime) if actor == "user:it-admin-1"
    ]
    assert [a for a in actions if a[0].startswith("user_")] == [
        ("user_created", "user:dana"),
        ("user_disabled", "user:dana"),
        ("user_enabled", "user:dana"),
        ("user_password_reset", "user:dana"),
    ]


def _login(site: Site, username: str, password: str) -> int:
    client = site.app.test_client()
    token = CSRF.search(client.get("/admin/login").get_data(as_text=True))
    assert token
    data = {"csrf_token": token.group(1), "username": username, "password": password}
    return client.post("/admin/login", data=data).status_code


def test_a_token_secret_is_shown_once_and_only_its_hash_is_kept(site: Site) -> None:
    assert sign_in(site.app, "compliance-1").get("/admin/tokens").status_code == 403
    it = sign_in(site.app, "it-admin-1")
    assert it.post("/admin/tokens", {"name": " ", "role": "viewer"}).status_code == 400
    created = it.post("/admin/tokens", {"name": "ehr-sync", "role": "viewer"})
    page = _text(created)
    assert created.status_code == 200 and "shown only once" in page
    secret = page.split('id="secret">')[1].split("<")[0]
    assert secret.startswith(accounts.TOKEN_PREFIX) and len(secret) > 40
    listing = _text(it.get("/admin/tokens"))
    assert "ehr-sync" in listing and secret not in listing and secret[:10] in listing
    with site.runtime.session_factory.begin() as session:
        row = session.scalars(select(m.ApiToken)).one()
        assert row.token_hash == accounts.token_digest(secret)
        stored = [str(getattr(row, c.key)) for c in m.ApiToken.__table__.columns]
        assert not any(secret in value for value in stored)
        assert accounts.token_for(session=session, secret=secret, now=NOW) is not None
    assert it.post(f"/admin/tokens/{row.id}/revoke").status_code == 303
    assert "already revoked" in _text(
        it.post(f"/admin/tokens/{row.id}/revoke", follow_redirects=True)
    )
    with site.runtime.session_factory() as session:
        assert accounts.token_for(session=session, secret=secret, now=NOW) is None
    entries = [e for e in audit_actions(site.runtime) if e[1].startswith("token_")]
    assert [(e[0], e[1], e[2]) for e in entries] == [
        ("user:it-admin-1", "token_created", "token:ehr-sync"),
        ("user:it-admin-1", "token_revoked", "token:ehr-sync"),
    ]
    assert secret not in str([e[3] for e in entries])


def test_the_audit_log_filters_pages_and_verifies_its_chain(site: Site) -> None:
    assert sign_in(site.app, "marketer-1").get("/admin/audit").status_code == 403
    compliance = sign_in(site.app, "compliance-1")
    it = sign_in(site.app, "it-admin-1")
    logins = _text(it.get("/admin/audit?action=login"))
    assert "user:compliance-1" in logins and "user:it-admin-1" in logins
    assert "<code>forbidden</code>" not in logins
    mine = _text(it.get("/admin/audit?actor=user:marketer-1"))
    assert "<code>forbidden</code>" in mine and "user:compliance-1" not in mine

    with site.runtime.session_factory.begin() as session:
        for i in range(57):
            audit.record(session=session, actor="test", action="bulk", now=NOW, details={"i": i})
    first_page = _text(it.get("/admin/audit?action=bulk"))
    assert first_page.count("<code>bulk</code>") == 50 and "i=56" in first_page
    older = first_page.split('rel="next" href="')[1].split('"')[0]
    assert "action=bulk" in older and "before=" in older
    second_page = _text(it.get(older))
    assert second_page.count("<code>bulk</code>") == 7 and "i=0<" in second_page
    assert 'rel="next"' not in second_page

    checked = _text(compliance.post("/admin/audit/verify", {"verify": "1"}))
    assert "The chain holds" in checked
    with site.runtime.session_factory() as session:
        first = session.scalars(select(m.AuditEntry).order_by(m.AuditEntry.id)).first()
        assert first is not None
    with tampering(site.runtime.engine) as connection:  # past the append-only triggers
        connection.execute(
            update(m.AuditEntry).where(m.AuditEntry.id == first.id).values(actor="user:nobody")
        )
    broken = _text(it.post("/admin/audit/verify", {"verify": "1"}))
    assert f"The chain is broken at entry <strong>#{first.id}</strong>" in broken
    assert "its content does not match its hash" in broken
