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
