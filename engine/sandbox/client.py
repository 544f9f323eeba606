"""Talk to a running sandbox's control endpoints (tests, the demo, benchmarks)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests


class SandboxClient:
    """What a sandbox recorded, and how it should misbehave, over HTTP."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._session = requests.Session()

    def messages(self, *, to: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Accepted messages, oldest first, in Twilio's JSON shape plus `status_callback`."""
        return list(self._snapshot(to=to, status=status)["messages"])

    def create_requests_per_to(self) -> dict[str, int]:
        """Create requests received per To number, accepted or not."""
        return dict(self._snapshot()["create_requests_per_to"])

    def accepted_per_to(self) -> dict[str, int]:
        """Messages accepted per To number: above 1 means a patient got a text twice."""
        return dict(self._snapshot()["accepted_per_to"])

    def callbacks(self) -> dict[str, int]:
        return dict(self._snapshot()["callbacks"])

    def faults(self) -> dict[str, Any]:
        return dict(self._get("/sandbox/faults"))

    def set_faults(self, faults: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
        """Replace the fault settings (see FaultConfig); left-out keys take defaults."""
        body = {**(faults or {}), **settings}
        response = self._session.post(
            f"{self.base_url}/sandbox/faults", json=body, timeout=self._timeout
        )
        if response.status_code == 400:
            raise ValueError(response.json()["error"])
        response.raise_for_status()
        return dict(response.json())

    def phones(self) -> list[dict[str, Any]]:
        """One summary per phone (number, received, sent, unread, last_at), latest first."""
        return list(self._get("/sandbox/phones.json")["phones"])

    def thread(self, number: str) -> dict[str, Any]:
        """A phone's conversation: {number, unread, messages: [{sid, direction (outbound:
        to the phone, inbound: from it), body, at, status}]}, oldest first."""
        return self._get(f"/sandbox/phones/{quote(number)}.json")

    def mark_read(self, number: str) -> None:
        response = self._session.post(
            f"{self.base_url}/sandbox/phones/{quote(number)}/read", timeout=self._timeout
        )
        response.raise_for_status()

    def text_from(self, number: str, body: str, *, url: str | None = None) -> dict[str, Any]:
        """The phone texts `body`; the sandbox POSTs it, signed, to the messaging webhook
        (`url`, else the sandbox's inbound_url). {sid, webhook_status, error}; a webhook
        that cannot be reached gives webhook_status None."""
        response = self._session.post(
            f"{self.base_url}/sandbox/phones/{quote(number)}/messages",
            json={"body": body, **({"url": url} if url else {})},
            timeout=self._timeout + 10,
        )
        if response.status_code == 400:
            raise ValueError(response.json()["error"])
        if response.status_code not in (201, 502):
            response.raise_for_status()
        return dict(response.json())

    def reset(self) -> None:
        """Forget every message and count (fault settings stay)."""
        response = self._session.delete(f"{self.base_url}/sandbox/messages", timeout=self._timeout)
        response.raise_for_status()

    def close(self) -> None:
        self._session.close()

    def _snapshot(self, **params: str | None) -> dict[str, Any]:
        return self._get("/sandbox/messages.json", {k: v for k, v in params.items() if v})

    def _get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        response = self._session.get(f"{self.base_url}{path}", params=params, timeout=self._timeout)
        response.raise_for_status()
        return dict(response.json())
