"""Configuration from the environment."""

from __future__ import annotations

from engine.sandbox.config import SANDBOX_AUTH_TOKEN
from engine.settings import Settings


def test_webhooks_fall_back_to_the_sandbox_token_only_for_the_sandbox() -> None:
    assert Settings.from_env({"ENGAGE_TRANSPORT": "sandbox"}).webhook_auth_token == (
        SANDBOX_AUTH_TOKEN
    )
    assert Settings.from_env({"ENGAGE_TRANSPORT": "twilio"}).webhook_auth_token is None
    configured = {"ENGAGE_TRANSPORT": "sandbox", "TWILIO_AUTH_TOKEN": "mine"}
    assert Settings.from_env(configured).webhook_auth_token == "mine"


def test_web_settings_have_safe_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.secret_key_path.name == "secret.key"
    assert settings.page_rate_per_minute == 30 and settings.login_rate_per_minute == 10


def test_workers_yield_the_cpu_to_the_web_server_unless_told_not_to() -> None:
    import multiprocessing

    from engine.cli_worker import lower_priority

    assert Settings.from_env({}).worker_nice == 10
    assert Settings.from_env({"ENGAGE_WORKER_NICE": "0"}).worker_nice == 0
    context = multiprocessing.get_context("spawn")  # a fork of a threaded runner can hang
    with context.Pool(1) as pool:
        before, after = pool.apply(_niceness_around, (lower_priority, 5))
    assert after == min(before + 5, 19)


def _niceness_around(lower, increment):  # type: ignore[no-untyped-def]
    import os

    before = os.nice(0)
    lower(increment)
    return before, os.nice(0)
