"""Creates per second against the sandbox: TwilioTransport.send vs raw SDK create calls,
and bare http.client keep-alive requests (what the server alone sustains).

    python -m bench sandbox [--messages 4000] [--threads 1,8,32] [--server process|thread]
        [--clients transport,raw sdk,http.client,async transport,raw sdk async]

"threads" is the concurrency: threads for the blocking clients, coroutines in flight for
the async ones (the SDK's create_async over aiohttp).

The sandbox runs in its own process by default (as `engage sandbox` would), so client and
server do not share one interpreter lock; `--server thread` runs it in this process, as the
tests do. Every run checks that the sandbox accepted each message exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from requests.adapters import HTTPAdapter
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from engine.sandbox.client import SandboxClient
from engine.sandbox.config import (
    SANDBOX_ACCOUNT_SID,
    SANDBOX_AUTH_TOKEN,
    SANDBOX_FROM_NUMBER,
    SandboxConfig,
)
from engine.sandbox.server import SandboxServer
from engine.settings import Settings
from engine.transports.base import OutboundMessage
from engine.transports.twilio import TwilioTransport
from engine.transports.twilio_async import AsyncTwilioTransport

SERVE = """
from engine.sandbox.config import SandboxConfig
from engine.sandbox.server import SandboxServer
server = SandboxServer(SandboxConfig(port=0))
print(server.bind(), flush=True)
server.serve_forever()
"""


@dataclass
class Server:
    url: str
    stop: Callable[[], None]
    cpu_seconds: Callable[[], float | None]


def start_server(mode: str, *, nice: int = 0) -> Server:
    """The sandbox in this process ("thread") or in a child Python ("process"; `nice`: its
    niceness, for a sandbox standing in for Twilio's servers, which are not on our cores)."""
    if mode == "thread":
        server = SandboxServer(SandboxConfig(port=0))
        return Server(server.start(), server.stop, lambda: None)
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", SERVE], cwd=root, stdout=subprocess.PIPE, text=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )  # fmt: skip
    assert child.stdout is not None
    url = child.stdout.readline().strip()

    def stop() -> None:
        child.terminate()
        child.wait(timeout=10)

    def cpu_seconds() -> float | None:
        try:  # Linux: utime + stime of the child, in clock ticks
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return Server(url, stop, cpu_seconds)


def bench_settings(url: str) -> Settings:
    return Settings(
        var_dir=Path("var"),
        database_url="sqlite://",
        master_key_file=Path("unused"),
        index_key_file=Path("unused"),
        twilio_api_base_url=url,
        twilio_account_sid=SANDBOX_ACCOUNT_SID,
        twilio_auth_token=SANDBOX_AUTH_TOKEN,
        twilio_from_number=SANDBOX_FROM_NUMBER,
    )


def transport_sender(url: str, threads: int) -> Callable[[int], None]:
    transport = TwilioTransport(bench_settings(url), pool_size=threads)

    def send(i: int) -> None:
        transport.send(OutboundMessage(to=f"+1555{i:07d}", body=f"bench {i}", reference=str(i)))

    return send


def raw_sender(url: str, threads: int) -> Callable[[int], None]:
    http = TwilioHttpClient()
    assert http.session is not None
    http.session.mount("http://", HTTPAdapter(pool_maxsize=threads, max_retries=0))
    client = Client(SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, http_client=http)
    client.api.base_url = url  # the SDK's own override: the API domain's base URL
    messages = client.api.v2010.accounts(SANDBOX_ACCOUNT_SID).messages

    def send(i: int) -> None:
        messages.create(to=f"+1555{i:07d}", from_=SANDBOX_FROM_NUMBER, body=f"bench {i}")

    return send


def raw_async_loop(url: str, concurrency: int, count: int) -> tuple[float, float]:
    """`count` raw SDK `create_async` calls, `concurrency` at a time, on aiohttp (the
    SDK's AsyncTwilioHttpClient): (wall seconds, CPU seconds of this process)."""

    async def main() -> tuple[float, float]:
        http = AsyncTwilioHttpClient()
        client = Client(SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, http_client=http)
        client.api.base_url = url
        messages = client.api.v2010.accounts(SANDBOX_ACCOUNT_SID).messages
        slots = asyncio.Semaphore(concurrency)

        async def send(i: int) -> None:
            async with slots:
                await messages.create_async(
                    to=f"+1555{i:07d}", from_=SANDBOX_FROM_NUMBER, body=f"bench {i}"
                )

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(send(i) for i in range(count)))
        elapsed = time.perf_counter() - start, time.process_time() - cpu
        await http.close()
        return elapsed

    return asyncio.run(main())


def http_sender(url: str, threads: int) -> Callable[[int], None]:
    """Bare http.client, one keep-alive connection per thread: what the server alone does."""
    parts = urlsplit(url)
    path = f"/2010-04-01/Accounts/{SANDBOX_ACCOUNT_SID}/Messages.json"
    token = base64.b64encode(f"{SANDBOX_ACCOUNT_SID}:{SANDBOX_AUTH_TOKEN}".encode()).decode()
    headers = {
        "Authorization": f"Basic {token}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    local = threading.local()

    def send(i: int) -> None:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(parts.hostname, parts.port)
        body = urlencode({"To": f"+1555{i:07d}", "From": SANDBOX_FROM_NUMBER, "Body": f"b {i}"})
        local.connection.request("POST", path, body, headers)
        response = local.connection.getresponse()
        response.read()
        if response.status != 201:
            raise RuntimeError(f"sandbox answered {response.status}")

    return send


def async_transport_loop(url: str, concurrency: int, count: int) -> tuple[float, float]:
    """AsyncTwilioTransport.send_async, `concurrency` at a time, submitted from this thread
    as the dispatcher does: (wall seconds, CPU seconds of this process)."""
    transport = AsyncTwilioTransport(bench_settings(url), pool_size=concurrency)
    slots = asyncio.Semaphore(concurrency)

    async def send(i: int) -> None:
        async with slots:
            message = OutboundMessage(to=f"+1555{i:07d}", body=f"bench {i}", reference=str(i))
            await transport.send_async(message)

    start, cpu = time.perf_counter(), time.process_time()
    for future in [transport.submit(send(i)) for i in range(count)]:
        future.result()
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    transport.close()
    return elapsed


SENDERS = {"transport": transport_sender, "raw sdk": raw_sender, "http.client": http_sender}
ASYNC_LOOPS = {"async transport": async_transport_loop, "raw sdk async": raw_async_loop}


def run(send: Callable[[int], None], n: int, threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        for i in range(n):
            send(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(send, range(n)))
    return time.perf_counter() - start, time.process_time() - cpu


def measure(server: Server, control: SandboxClient, label: str, threads: int, n: int) -> str:
    control.reset()
    server_cpu = server.cpu_seconds()
    if label in ASYNC_LOOPS:
        seconds, client_cpu = ASYNC_LOOPS[label](server.url, threads, n)
    else:
        seconds, client_cpu = run(SENDERS[label](server.url, threads), n, threads)
    after = server.cpu_seconds()
    accepted = control.accepted_per_to()
    dups = sum(1 for c in accepted.values() if c > 1)
    server_ms = (
        "-" if after is None or server_cpu is None else f"{(after - server_cpu) * 1e3 / n:.2f}"
    )
    return (
        f"{label:<12} {threads:>7} {seconds:>8.2f} {n / seconds:>10.0f} "
        f"{client_cpu * 1e3 / n:>10.2f} {server_ms:>10} {sum(accepted.values()):>9} {dups:>4}"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench sandbox")
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--threads", default="1,8,32")
    parser.add_argument("--server", choices=["process", "thread"], default="process")
    parser.add_argument(
        "--clients", default=",".join([*SENDERS, *ASYNC_LOOPS]), help="transport,raw sdk,..."
    )
    args = parser.parse_args(argv)
    server = start_server(args.server)
    control = SandboxClient(server.url)
    print(f"sandbox ({args.server}) at {server.url}; {args.messages} creates per run")
    print("CPU columns: milliseconds of CPU per create in the client and the server process")
    print(
        f"{'client':<12} {'threads':>7} {'seconds':>8} {'creates/s':>10} {'client CPU':>10} "
        f"{'server CPU':>10} {'accepted':>9} {'dups':>4}"
    )
    try:
        for threads in [int(t) for t in args.threads.split(",")]:
            for label in args.clients.split(","):
                print(measure(server, control, label, threads, args.messages), flush=True)
    finally:
        control.close()
        server.stop()
