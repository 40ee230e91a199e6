"""HTTPS: ``WebConfig.certfile``/``keyfile`` and ``trioflow serve --certfile/--keyfile``.

Real servers on 127.0.0.1 with a self-signed certificate made here: event streams
read over HTTP/2 (negotiated by ALPN) and HTTP/1.1 by ``httpx``, resumed with
``Last-Event-ID``, a WebSocket over TLS, the handshake timeout, the shutdown, and the
command's options.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from conftest import assert_no_traceback, flood, start_run, talker

from trioflow.client import sse_events, ws_connect
from trioflow.web import WebConfig

if TYPE_CHECKING:
    from conftest import RunCli, StartWebServer, WebServer

    from trioflow.web._fanout import EventFanout
    from trioflow.web._runs import RunHub


# -- a self-signed certificate -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for ``localhost`` and ``127.0.0.1``, and its key (PEM files)."""

    certfile: Path
    keyfile: Path

    def client_context(self) -> ssl.SSLContext:
        """A client's context that trusts this certificate (and nothing else)."""
        return ssl.create_default_context(cafile=str(self.certfile))


def make_certificate(
    folder: Path, *, name: str = "cert", password: bytes | None = None
) -> Certificate:
    """Write a fresh self-signed certificate and its key to ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trioflow test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    certfile, keyfile = folder / f"{name}.pem", folder / f"{name}-key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return Certificate(certfile, keyfile)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


async def start_tls_server(
    start_web_server: StartWebServer, certificate: Certificate, **options: Any
) -> WebServer:
    server = await start_web_server(
        certfile=certificate.certfile, keyfile=certificate.keyfile, **options
    )
    assert server.url.startswith("https://127.0.0.1:")
    assert server.ws_url.startswith("wss://127.0.0.1:")
    return server


def https_client(
    server: WebServer, certificate: Certificate, *, http2: bool, **headers: str
) -> httpx.AsyncClient:
    """An ``httpx`` client that trusts ``certificate``; with ``http2`` it offers ``h2`` by ALPN
    (and ``http/1.1``: the server chooses), without it only HTTP/1.1."""
    return httpx.AsyncClient(
        base_url=server.url,
        verify=certificate.client_context(),
        http2=http2,
        timeout=10,
        headers=headers,
    )


@dataclasses.dataclass
class Frame:
    id: int | None
    event: str | None
    data: dict[str, Any]


class EventReader:
    """The frames with data of an event-stream response read by ``httpx``, a few or all."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self) -> Frame | None:
        """The next frame with data, or None at the end of the response."""
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                continue
            if "data" in fields:
                return Frame(
                    int(fields["id"]) if "id" in fields else None,
                    fields.get("event"),
                    json.loads(fields["data"]),
                )
            fields = {}
        return None

    async def rest(self) -> list[Frame]:
        """Every remaining frame with data, up to the end of the response."""
        frames = []
        while (frame := await self.next()) is not None:
            frames.append(frame)
        return frames

    async def aclose(self) -> None:
        await self._lines.aclose()  # type: ignore[attr-defined]


async def read_stream(response: httpx.Response) -> list[Frame]:
    """The frames with data of an event-stream response, to its end."""
    return await EventReader(response).rest()


async def fanout_of(hub: RunHub, run_id: str) -> EventFanout:
    """The run's event-stream fan-out, once a connection has joined it."""
    with trio.fail_after(5):
        return await hub.wait_joined(run_id, 1)


TERMINAL = ("flow.completed", "flow.failed", "flow.cancelled")


# -- event streams ------------------------------------------------------------------------------


@pytest.mark.parametrize(("http2", "version"), [(True, "HTTP/2"), (False, "HTTP/1.1")])
async def test_an_event_stream_over_tls_delivers_every_event_in_order(
    start_web_server: StartWebServer, certificate: Certificate, http2: bool, version: str
) -> None:
    server = await start_tls_server(
        start_web_server, certificate, agent=talker(words=120, pace=400)
    )
    async with https_client(server, certificate, http2=http2) as http:
        created = await http.post("/runs", json={"task": "talk"})
        assert created.status_code == 201, created.text
        assert created.http_version == version
        run_id = created.json()["run_id"]
        assert created.json()["events_url"].startswith("https://")
        async with http.stream("GET", f"/runs/{run_id}/events") as response:
            assert response.status_code == 200
            assert response.http_version == version
            assert response.headers["content-type"].startswith("text/event-stream")
            assert "connection" not in response.headers  # no direct writes, no forced close
            fanout = await fanout_of(server.hub, run_id)
            frames = await read_stream(response)
    run = server.executor.get_run(run_id)
    assert [f.id for f in frames] == list(range(1, run.last_seq + 1))
    assert frames[-1].event == "flow.completed"
    assert sum(f.event == "token.received" for f in frames) == 120
    stats = fanout.statistics()
    assert stats.direct_writes == 0  # every byte went through the TLS layer
    assert stats.queued_writes > 0


async def test_one_http2_connection_carries_more_event_streams_than_a_browser_opens_per_origin(
    start_web_server: StartWebServer, certificate: Certificate
) -> None:
    server = await start_tls_server(start_web_server, certificate, agent=talker(words=40, pace=200))
    streams = 10  # HTTP/1.1 browsers stop at 6 per origin
    run_ids = [await start_run(server) for _ in range(streams)]
    results: dict[str, list[Frame]] = {}
    async with https_client(server, certificate, http2=True) as http:

        async def follow(run_id: str) -> None:
            async with http.stream("GET", f"/runs/{run_id}/events") as response:
                assert response.http_version == "HTTP/2"
                results[run_id] = await read_stream(response)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for run_id in run_ids:
                    nursery.start_soon(follow, run_id)
    assert len(server.hub.fanouts()) == 0
    for run_id in run_ids:
        run = server.executor.get_run(run_id)
        assert [f.id for f in results[run_id]] == list(range(1, run.last_seq + 1))
        assert results[run_id][-1].event == "flow.completed"


@pytest.mark.parametrize("http2", [True, False])
async def test_last_event_id_resumes_over_tls(
    start_web_server: StartWebServer, certificate: Certificate, http2: bool
) -> None:
    server = await start_tls_server(start_web_server, certificate, agent=talker(words=30))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    await run.wait()
    async with https_client(server, certificate, http2=http2, **{"Last-Event-ID": "7"}) as http:
        async with http.stream("GET", f"/runs/{run_id}/events") as response:
            frames = await read_stream(response)
    assert [f.id for f in frames] == list(range(8, run.last_seq + 1))
    assert frames[-1].event == "flow.completed"


async def test_the_sse_client_follows_a_run_over_http2(
    start_web_server: StartWebServer, certificate: Certificate
) -> None:
    server = await start_tls_server(
        start_web_server, certificate, agent=talker(words=60, pace=300), token="tls-token-1"
    )
    run_id = await start_run(server)
    async with https_client(server, certificate, http2=True) as http:
        url = f"{server.url}/runs/{run_id}/events"
        seen = []
        async with sse_events(url, client=http, token="tls-token-1", after=5) as events:
            async for event in events:
                seen.append(event)
    run = server.executor.get_run(run_id)
    assert [e.seq for e in seen] == list(range(6, run.last_seq + 1))
    assert seen[-1].type == "flow.completed"


# -- WebSockets -------------------------------------------------------------------------------------


async def test_a_websocket_over_tls_streams_a_run(
    start_web_server: StartWebServer, certificate: Certificate
) -> None:
    server = await start_tls_server(start_web_server, certificate, agent=talker(words=50, pace=300))
    types = []
    with trio.fail_after(10):
        async with ws_connect(
            f"{server.ws_url}/ws", ssl_context=certificate.client_context()
        ) as ws:
            run_id = await ws.start("talk over TLS")
            async for event in ws.run_events(run_id):
                types.append(event.type)
    assert types[0] == "flow.started"
    assert types[-1] == "flow.completed"
    assert types.count("token.received") == 50
    # The run's own WebSocket, resumed after an event, by its https:// URL.
    async with ws_connect(
        f"{server.url}/runs/{run_id}/ws?after=3", ssl_context=certificate.client_context()
    ) as ws:
        seqs = [event.seq async for event in ws.run_events(run_id)]
    assert seqs == list(range(4, server.executor.get_run(run_id).last_seq + 1))


async def test_ws_connect_trusts_ssl_cert_file_by_default(
    start_web_server: StartWebServer, certificate: Certificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `SSL_CERT_FILE=cert.pem trioflow watch wss://...` relies on (docs/howto/https.rst).
    server = await start_tls_server(start_web_server, certificate, agent=talker(words=5))
    run_id = await start_run(server)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.certfile))
    with trio.fail_after(10):
        async with ws_connect(f"{server.ws_url}/runs/{run_id}/ws") as ws:
            types = [event.type async for event in ws.run_events(run_id)]
    assert types[-1] == "flow.completed"


async def test_a_websocket_client_refuses_a_certificate_it_does_not_trust(
    start_web_server: StartWebServer, certificate: Certificate, server_log: Any
) -> None:
    server = await start_tls_server(start_web_server, certificate)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as refused:
        async with ws_connect(f"{server.ws_url}/ws", ssl_context=ssl.create_default_context()):
            pass  # pragma: no cover
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    with trio.fail_after(5):
        while not any("TLS handshake" in r.getMessage() for r in server_log.records):  # noqa: ASYNC110 - a log, no event
            await trio.sleep(0.01)
    (line,) = [r.getMessage() for r in server_log.records if "TLS handshake" in r.getMessage()]
    assert "failed: [SSL: " in line, line  # the client's alert, or the end of its connection
    assert_no_traceback(server_log)


# -- the handshake ------------------------------------------------------------------------------


async def test_a_client_that_never_handshakes_is_closed_after_the_header_timeout(
    start_web_server: StartWebServer, certificate: Certificate, server_log: Any
) -> None:
    server = await start_tls_server(start_web_server, certificate, header_timeout=0.5)
    port = int(server.url.rsplit(":", 1)[1])
    async with await trio.open_tcp_stream("127.0.0.1", port) as silent:
        start = trio.current_time()
        with trio.fail_after(5):
            assert await silent.receive_some() == b""  # closed by the server
        waited = trio.current_time() - start
    assert 0.4 < waited < 3
    lines = [r.getMessage() for r in server_log.records if "handshake" in r.getMessage()]
    assert len(lines) == 1 and "no TLS handshake within 0.5 s" in lines[0], lines
    assert_no_traceback(server_log)


async def test_a_cleartext_request_to_the_tls_port_is_one_log_line(
    start_web_server: StartWebServer, certificate: Certificate, server_log: Any
) -> None:
    server = await start_tls_server(start_web_server, certificate)
    cleartext = "http://" + server.url.split("://", 1)[1]
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(f"{cleartext}/healthz")
    with trio.fail_after(5):
        while not any("TLS handshake" in r.getMessage() for r in server_log.records):  # noqa: ASYNC110 - a log, no event
            await trio.sleep(0.01)
    (line,) = [r for r in server_log.records if "TLS handshake" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert "failed: [SSL: HTTP_REQUEST]" in line.getMessage()
    assert_no_traceback(server_log)
    # The server still serves TLS clients.
    async with https_client(server, certificate, http2=True) as http:
        assert (await http.get("/healthz")).status_code == 200


# -- connections ----------------------------------------------------------------------------


async def test_a_tls_connection_the_client_closed_while_idle_leaves_at_once(
    start_web_server: StartWebServer, certificate: Certificate
) -> None:
    # One connection at most: the second client only gets in once the first is gone,
    # long before the keep-alive timeout (Hypercorn alone waits it out).
    server = await start_tls_server(start_web_server, certificate, max_connections=1)
    for http2 in (False, True, False):
        with trio.fail_after(2):
            while True:
                try:
                    async with https_client(server, certificate, http2=http2) as http:
                        assert (await http.get("/healthz")).status_code == 200
                        await trio.sleep(0.1)  # idle, kept alive, then closed by the client
                    break
                except httpx.TransportError:
                    await trio.sleep(0.05)


async def test_a_tls_connection_over_the_cap_is_closed(
    start_web_server: StartWebServer, certificate: Certificate, server_log: Any
) -> None:
    server = await start_tls_server(start_web_server, certificate, max_connections=1)
    async with https_client(server, certificate, http2=True) as first:
        assert (await first.get("/healthz")).status_code == 200
        async with https_client(server, certificate, http2=True) as second:
            with trio.fail_after(5), pytest.raises(httpx.TransportError):
                await second.get("/healthz")
        assert (await first.get("/healthz")).status_code == 200
    assert_no_traceback(server_log)


# -- shutdown ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("http2", [True, False])
async def test_a_graceful_shutdown_ends_a_tls_event_stream_with_flow_cancelled(
    start_web_server: StartWebServer, certificate: Certificate, http2: bool, server_log: Any
) -> None:
    server = await start_tls_server(start_web_server, certificate, agent=talker(words=400, pace=50))
    run_id = await start_run(server)
    async with https_client(server, certificate, http2=http2) as http:
        async with http.stream("GET", f"/runs/{run_id}/events") as response:
            reader = EventReader(response)
            first = await reader.next()
            assert first is not None and first.event == "flow.started"
            server.stop.set()
            with trio.fail_after(5):
                frames = await reader.rest()
        with trio.fail_after(5):
            await server.stopped.wait()
    assert frames[-1].event == "flow.cancelled"
    assert frames[-1].data["data"]["reason"] == "server shutdown"
    assert_no_traceback(server_log)


@pytest.mark.parametrize("http2", [True, False])
async def test_a_tls_client_that_stops_reading_cannot_hold_the_shutdown(
    start_web_server: StartWebServer, certificate: Certificate, server_log: Any, http2: bool
) -> None:
    server = await start_tls_server(
        start_web_server, certificate, agent=flood(events=200), shutdown_timeout=1.0
    )
    run_id = await start_run(server)
    async with https_client(server, certificate, http2=http2) as http:
        async with http.stream("GET", f"/runs/{run_id}/events") as response:
            assert response.status_code == 200
            await trio.sleep(0.5)  # the flood fills the socket buffers: the server blocks
            start = trio.current_time()
            server.stop.set()
            with trio.fail_after(5):
                await server.stopped.wait()
            assert trio.current_time() - start < 3
    messages = [r.getMessage() for r in server_log.records]
    assert any("closed 1 connection(s) still open" in m for m in messages), messages
    assert_no_traceback(server_log)


async def test_cancelling_serve_closes_tls_connections_at_once(
    nursery: trio.Nursery, certificate: Certificate
) -> None:
    from trioflow import StreamingFlowExecutor
    from trioflow.web import create_app, serve

    config = WebConfig(port=0, certfile=certificate.certfile, keyfile=certificate.keyfile)
    app = create_app(StreamingFlowExecutor(), agent=talker(words=400, pace=50), config=config)
    scope = trio.CancelScope()
    done = trio.Event()

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        with scope:
            await serve(app, task_status=task_status)
        done.set()

    (url,) = await nursery.start(run)
    run_id = await start_run(url)
    context = ssl.create_default_context(cafile=str(certificate.certfile))
    async with httpx.AsyncClient(base_url=url, verify=context, http2=True) as http:
        async with http.stream("GET", f"/runs/{run_id}/events") as response:
            reader = EventReader(response)
            assert await reader.next() is not None
            scope.cancel()  # the second signal
            with trio.fail_after(3):
                await done.wait()
            with trio.fail_after(3), pytest.raises(httpx.HTTPError):
                await reader.rest()  # the connection ends mid-response
            await reader.aclose()


# -- configuration -------------------------------------------------------------------------------------


def test_webconfig_takes_both_tls_files_or_neither(certificate: Certificate) -> None:
    config = WebConfig(certfile=str(certificate.certfile), keyfile=str(certificate.keyfile))  # type: ignore[arg-type]
    assert config.certfile == certificate.certfile and config.scheme == "https"
    assert WebConfig().scheme == "http"
    with pytest.raises(ValueError, match="certfile needs keyfile"):
        WebConfig(certfile=certificate.certfile)
    with pytest.raises(ValueError, match="keyfile needs certfile"):
        WebConfig(keyfile=certificate.keyfile)


def test_webconfig_refuses_tls_files_it_cannot_use(
    certificate: Certificate, tmp_path: Path
) -> None:
    other = make_certificate(tmp_path, name="other")
    with pytest.raises(ValueError, match=r"certfile '.*missing.pem' is not a file"):
        WebConfig(certfile=tmp_path / "missing.pem", keyfile=certificate.keyfile)
    with pytest.raises(ValueError, match=r"keyfile .* is not a file"):
        WebConfig(certfile=certificate.certfile, keyfile=tmp_path)
    with pytest.raises(ValueError, match="cannot use certfile"):  # a key of another certificate
        WebConfig(certfile=certificate.certfile, keyfile=other.keyfile)
    with pytest.raises(ValueError, match="cannot use certfile"):  # the key is not a certificate
        WebConfig(certfile=certificate.keyfile, keyfile=certificate.keyfile)
    encrypted = make_certificate(tmp_path, name="locked", password=b"secret")
    with pytest.raises(ValueError, match="cannot use certfile"):  # no prompt for a pass phrase
        WebConfig(certfile=encrypted.certfile, keyfile=encrypted.keyfile)
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "unreadable.pem"
        unreadable.write_bytes(certificate.keyfile.read_bytes())
        unreadable.chmod(0)
        with pytest.raises(ValueError, match=r"keyfile .* cannot be read"):
            WebConfig(certfile=certificate.certfile, keyfile=unreadable)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--certfile", "{cert}"], "certfile needs keyfile"),
        (["--keyfile", "{key}"], "keyfile needs certfile"),
        (["--certfile", "{cert}", "--keyfile", "{missing}"], "is not a file"),
        (["--certfile", "{key}", "--keyfile", "{key}"], "cannot use certfile"),
    ],
)
def test_serve_command_refuses_bad_tls_options_with_one_line(
    run_cli: RunCli, certificate: Certificate, tmp_path: Path, args: list[str], expected: str
) -> None:
    paths = {
        "cert": str(certificate.certfile),
        "key": str(certificate.keyfile),
        "missing": str(tmp_path / "missing.pem"),
    }
    result = run_cli("serve", "--port", "0", *(a.format(**paths) for a in args))
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trioflow serve: "), lines
    assert expected in lines[0]


def test_serve_command_reads_the_tls_files_from_the_environment(
    run_cli: RunCli, certificate: Certificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOFLOW_CERTFILE", str(certificate.certfile))
    result = run_cli("serve", "--port", "0")
    assert result.returncode == 2, result
    assert result.stderr.strip() == (
        "trioflow serve: certfile needs keyfile too: TLS takes both a certificate and its key"
    )


async def test_serve_command_serves_https_until_sigint(certificate: Certificate) -> None:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TRIOFLOW_KEYFILE": str(certificate.keyfile),
    }
    env.pop("ANTHROPIC_API_KEY", None)
    command = [sys.executable, "-m", "trioflow", "serve", "--port", "0", "--pace", "0"]
    command += ["--certfile", str(certificate.certfile)]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            functools.partial(
                trio.run_process, command, stderr=subprocess.PIPE, env=env, check=False
            )
        )
        assert process.stderr is not None
        output = b""
        with trio.fail_after(20):
            while b"Ctrl-C to stop" not in output:
                chunk = await process.stderr.receive_some()
                assert chunk, output
                output += chunk
        url = output.decode().split("serving on ", 1)[1].split()[0]
        assert url.startswith("https://127.0.0.1:")
        async with _client(url, certificate) as http:
            health = await http.get("/healthz")
            assert health.status_code == 200
            assert health.http_version == "HTTP/2"
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            while chunk := await process.stderr.receive_some():
                output += chunk
            await process.wait()
    assert process.returncode == 0, output.decode()
    assert b"trioflow: stopped" in output


@asynccontextmanager
async def _client(url: str, certificate: Certificate) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=url, verify=certificate.client_context(), http2=True, timeout=10
    ) as http:
        yield http
