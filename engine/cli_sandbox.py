"""`engage sandbox`: run the local Twilio-compatible server on its own."""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.runtime import Runtime


def _faults(value: str | None) -> dict[str, object]:
    if not value:
        return {}
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise click.BadParameter("expected a JSON object of fault settings")
    return data


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8099, show_default=True, type=int)
@click.option("--account-sid", help="Default: TWILIO_ACCOUNT_SID or the sandbox's AC000...")
@click.option("--auth-token", help="Default: TWILIO_AUTH_TOKEN or 'sandbox-token'.")
@click.option(
    "--faults",
    help='Fault settings as JSON, or @FILE: {"error_codes": {"21610": 0.1}, '
    '"http_500_rate": 0.01, "seed": 7, ...} (changeable later: POST /sandbox/faults).',
)
@click.option(
    "--delivered-delay-ms",
    default=20.0,
    show_default=True,
    type=float,
    help="Time from sent to delivered (status callbacks follow it).",
)
@click.pass_obj
def sandbox(
    rt: Runtime,
    host: str,
    port: int,
    account_sid: str | None,
    auth_token: str | None,
    faults: str | None,
    delivered_delay_ms: float,
) -> None:
    """Run the sandbox: Twilio's Messages API on HTTP, signed status callbacks, faults.

    Point the engine at it with ENGAGE_TRANSPORT=sandbox (or twilio with
    TWILIO_API_BASE_URL=http://HOST:PORT and the same credentials).
    """
    from engine.sandbox.config import (
        SANDBOX_ACCOUNT_SID,
        SANDBOX_AUTH_TOKEN,
        FaultConfig,
        FaultConfigError,
        SandboxConfig,
    )
    from engine.sandbox.server import SandboxServer

    try:
        fault_config = FaultConfig.from_dict(_faults(faults))
    except FaultConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from exc
    config = SandboxConfig(
        host=host,
        port=port,
        account_sid=account_sid or rt.settings.twilio_account_sid or SANDBOX_ACCOUNT_SID,
        auth_token=auth_token or rt.settings.twilio_auth_token or SANDBOX_AUTH_TOKEN,
        faults=fault_config,
        delivered_delay_ms=delivered_delay_ms,
    )
    server = SandboxServer(config)
    url = server.bind()
    click.echo(f"sandbox on {url} (account {config.account_sid}); Ctrl-C stops it")
    click.echo(f"  messages: {url}/sandbox/messages.json   faults: {url}/sandbox/faults")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("sandbox stopped")


def register(group: click.Group) -> None:
    group.add_command(sandbox)
