"""Audit the pinned dependencies (requirements.lock) with pip-audit.

pip-audit's default service asks PyPI for each pinned release
(`/pypi/<name>/<version>/json`). Where PyPI answers that, it runs as is, with `--strict`,
so a pin it cannot audit fails the run. Some networks (a registry proxy or mirror) serve
only `/pypi/<name>/json`, which carries the vulnerabilities of the project's latest
release; there pip-audit would skip every pin. Then this script fetches that page for
every pin and, through pip-audit's OSV client on a loopback port, audits each pin that is
its project's latest release against those records. Pins behind the latest release cannot
be audited from such a network: they are named, never counted as clean.

Exit status: 0 no known vulnerability in what was audited; 1 a known vulnerability, or
pip-audit failed; 2 PyPI could not be reached (nothing was audited).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PYPI = "https://pypi.org/pypi"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")
ATTEMPTS = 4
TIMEOUT = 20.0


class Unreachable(Exception):
    """PyPI did not answer after every attempt."""


@dataclass(frozen=True)
class Release:
    name: str
    pinned: str
    latest: str
    vulnerabilities: tuple[dict, ...]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock: Path) -> dict[str, str]:
    """Every `name==version` line of a pip requirements file, by canonical name."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def get(url: str) -> tuple[int, bytes]:
    """GET with a timeout; retries connection errors, 429 and 5xx with backoff."""
    for attempt in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            if error.code != 429 and error.code < 500:
                return error.code, b""
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            pass
        if attempt + 1 < ATTEMPTS:
            time.sleep(2**attempt)
    raise Unreachable(url)


def release_endpoint_answers(name: str, version: str) -> bool:
    status, _ = get(f"{PYPI}/{name}/{version}/json")
    return status == 200


def latest_release(name: str, pinned: str) -> Release:
    status, body = get(f"{PYPI}/{name}/json")
    if status != 200:
        raise Unreachable(f"{PYPI}/{name}/json answered {status}")
    project = json.loads(body)
    vulnerabilities = tuple(v for v in project["vulnerabilities"] if not v.get("withdrawn"))
    return Release(name, pinned, project["info"]["version"], vulnerabilities)


def as_osv(release: Release) -> dict:
    """PyPI's vulnerability records of a release, in the OSV shape pip-audit reads."""
    vulns, seen = [], set()
    for record in release.vulnerabilities:
        ids = {record["id"], *(record.get("aliases") or [])}
        if ids & seen:
            continue
        seen |= ids
        events = [{"introduced": "0"}] + [{"fixed": v} for v in record.get("fixed_in") or []]
        vulns.append(
            {
                "id": record["id"],
                "aliases": record.get("aliases") or [],
                "details": record.get("summary") or record.get("details") or "",
                "affected": [
                    {
                        "package": {"name": release.name, "ecosystem": "PyPI"},
                        "ranges": [{"type": "ECOSYSTEM", "events": events}],
                    }
                ],
            }
        )
    return {"vulns": vulns} if vulns else {}


def serve_osv(answers: dict[tuple[str, str], dict]) -> ThreadingHTTPServer:
    """An OSV `/v1/query` endpoint on 127.0.0.1 that knows only the given releases."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            key = (canonical(query["package"]["name"]), query["version"])
            answer = answers.get(key)
            body = json.dumps(answer).encode() if answer is not None else b"{}"
            self.send_response(200 if answer is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def pip_audit(*args: str) -> int:
    command = [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", *args]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.run(command, timeout=900).returncode


def audit_latest_releases(pins: dict[str, str]) -> int:
    with ThreadPoolExecutor(max_workers=8) as pool:
        releases = list(pool.map(latest_release, pins, pins.values()))
    current = [r for r in releases if r.pinned == r.latest]
    behind = [r for r in releases if r.pinned != r.latest]
    print(
        f"PyPI here reports vulnerabilities for latest releases only: auditing the "
        f"{len(current)} of {len(releases)} pins that are their project's latest release."
    )
    server = serve_osv({(r.name, r.pinned): as_osv(r) for r in current})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            audited = Path(tmp, "audited.txt")
            audited.write_text("".join(f"{r.name}=={r.pinned}\n" for r in current))
            status = pip_audit(
                "--strict",
                "--no-deps",
                "--disable-pip",
                "--vulnerability-service=osv",
                f"--osv-url=http://127.0.0.1:{server.server_port}/v1/query",
                f"--cache-dir={tmp}/cache",
                "--requirement",
                str(audited),
            )
    finally:
        server.shutdown()
    for r in behind:
        print(f"NOT AUDITED: {r.name}=={r.pinned} (latest {r.latest}; no data for it here)")
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, nargs="?", default=Path("requirements.lock"))
    lock = parser.parse_args().lock
    pins = read_pins(lock)
    if not pins:
        print(f"{lock}: no pinned requirement", file=sys.stderr)
        return 1
    try:
        name, version = next(iter(pins.items()))
        if release_endpoint_answers(name, version):
            return pip_audit("--strict", "--disable-pip", "--requirement", str(lock))
        return audit_latest_releases(pins)
    except Unreachable as error:
        print(f"dependency audit impossible: PyPI did not answer ({error})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
