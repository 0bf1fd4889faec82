"""Issue 14 on the live server: connection and viewer caps, hostile JSON, Host/Origin
checks, no absolute server paths for viewers, a status line for malformed HTTP.

Real sockets on 127.0.0.1, ephemeral ports; waits are on messages, bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from livestack.service.guard import HostPolicy, PathRedactor, split_host
from tests.service.test_server import TIMEOUT_S, http, recv_json, run, running_server


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    writer.close()
    return raw


def test_viewers_beyond_the_cap_are_refused_and_the_rest_keep_working() -> None:
    async def scenario() -> None:
        async with running_server(max_viewers=3) as srv:
            viewers = [await connect(srv.ws_url).__aenter__() for _ in range(3)]
            for ws in viewers:
                assert (await recv_json(ws))["type"] == "hello"
            with pytest.raises(InvalidStatus) as info:
                async with connect(srv.ws_url):
                    pass
            assert info.value.response.status_code == 503
            assert srv.server.viewer_count == 3
            status, _, body = await http(srv.port, "GET", "/healthz")
            assert status == 200 and json.loads(body)["viewers"] == 3
            srv.hub.publish({"type": "alert", "level": "info", "message": "x"})
            for ws in viewers:
                assert (await recv_json(ws))["type"] == "alert"
                await ws.close()
            assert 'reason="viewers"' in srv.metrics.render()

    run(scenario)


def test_connections_beyond_the_cap_get_503_at_once() -> None:
    async def scenario() -> None:
        async with running_server(max_connections=4) as srv:
            assert srv.server.connection_cap == 4
            idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(4)]
            raw = await _raw(srv.port, b"")  # the 5th: answered without sending anything
            assert raw.startswith(b"HTTP/1.1 503 "), raw[:80]
            for _reader, writer in idle:
                writer.close()
            # Once they are gone, requests are served again.
            for _ in range(int(TIMEOUT_S * 10)):
                status, _, _ = await http(srv.port, "GET", "/healthz")
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200

    run(scenario)


def test_connection_cap_keeps_a_descriptor_reserve() -> None:
    import resource

    from livestack.service.limits import connection_cap, open_fd_count

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = connection_cap(10**9, 64)
    assert cap <= soft - 64 - open_fd_count() + 1
    assert connection_cap(5, 64) == 5


@pytest.mark.parametrize("payload", [
    "[" * 30_000 + "]" * 30_000,
    '{"v": 1, "type": "command", "id": ' + "9" * 5000 + "}",
])
def test_hostile_json_closes_with_1003_and_one_line(payload: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_server() as srv:
            bad = await connect(srv.ws_url, max_size=None)
            await bad.send(payload)
            await asyncio.wait_for(bad.wait_closed(), TIMEOUT_S)
            assert bad.close_code == 1003 and bad.close_reason == "malformed JSON"
            # The same bodies over HTTP: 400 (after the token check), no 500.
            status, _, _ = await http(srv.port, "POST", "/api/command/pause",
                                      {"Authorization": "Bearer op-7f3c2a9e-token-SECRET"},
                                      payload.encode())
            assert status == 400

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert [r for r in caplog.records if "unusable JSON" in r.getMessage()]


def test_foreign_host_and_origin_are_refused() -> None:
    async def scenario() -> None:
        async with running_server(allowed_hosts=("astro.example.org",)) as srv:
            for host, expect in (("evil.example.com", 421), (f"rebind.attacker:{srv.port}", 421),
                                 ("127.0.0.1", 200), (f"localhost:{srv.port}", 200),
                                 ("[::1]", 200), ("astro.example.org", 200)):
                raw = await _raw(srv.port, f"GET /api/stacks HTTP/1.1\r\nHost: {host}"
                                           "\r\n\r\n".encode())
                assert raw.startswith(f"HTTP/1.1 {expect} ".encode()), (host, raw[:60])
            raw = await _raw(srv.port, b"GET /api/stacks HTTP/1.1\r\n\r\n")  # no Host
            assert raw.startswith(b"HTTP/1.1 421 ")
            with pytest.raises(InvalidStatus) as info:
                async with connect(srv.ws_url, origin="http://evil.example.com"):  # type: ignore[arg-type]
                    pass
            assert info.value.response.status_code == 403
            async with connect(srv.ws_url, origin=f"http://127.0.0.1:{srv.port}") as ok:  # type: ignore[arg-type]
                assert (await recv_json(ok))["type"] == "hello"
            status, _, _ = await http(srv.port, "POST", "/api/command/pause",
                                      {"Origin": "https://evil.example.com"}, b"{}")
            assert status == 403 and srv.commands.calls == []

    run(scenario)


def test_host_policy_and_redactor_units(tmp_path) -> None:
    policy = HostPolicy(("proxy.lan",))
    assert policy.host_allowed("192.168.1.5:8765") and policy.host_allowed("PROXY.lan")
    assert not policy.host_allowed("127.0.0.1.nip.io") and not policy.host_allowed("")
    assert split_host("[fe80::1]:80") == ("fe80::1", "80") and split_host("a:b") == ("", "")
    assert policy.origin_allowed(None, "x") and not policy.origin_allowed("null", "127.0.0.1")
    assert policy.origin_allowed("http://127.0.0.1:8765", "127.0.0.1:8765")
    assert not policy.origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8765")
    watch = tmp_path / "in"
    redact = PathRedactor([watch, tmp_path / "out"])
    event = redact({"file": f"{watch}/night/a.fits", "reference": "/elsewhere/ref.fits",
                    "message": f"{watch}/night/a.fits: FWHM jumped", "n": 3,
                    "nested": {"path": "/x/y.fits"}})
    assert event == {"file": "night/a.fits", "reference": "ref.fits",
                     "message": "night/a.fits: FWHM jumped", "n": 3,
                     "nested": {"path": "y.fits"}}


def test_viewers_never_see_absolute_paths(tmp_path) -> None:
    async def scenario() -> None:
        async with running_server() as srv:
            srv.hub.redact = PathRedactor([tmp_path])
            path = f"{tmp_path}/M42/light_001.fits"
            async with connect(srv.ws_url) as ws:
                assert (await recv_json(ws))["type"] == "hello"
                srv.hub.update_stack("s/1", {"reference": path, "frames": 1})
                event = {"type": "frame", "stack_id": "s/1", "file": path,
                         "message": f"{path}: accepted"}
                srv.hub.publish(event)
                srv.hub.record_frame("s/1", event)
                text = json.dumps(await recv_json(ws))
                _, _, body = await http(srv.port, "GET", "/api/stacks")
                _, _, frames = await http(srv.port, "GET", "/api/stacks/s%2F1")
            for blob in (text, body.decode(), frames.decode()):
                assert str(tmp_path) not in blob and "M42/light_001.fits" in blob

    run(scenario)


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n", b"GET /a b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nbad header line\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
])
def test_malformed_http_gets_a_400_status_line(request_bytes: bytes) -> None:
    async def scenario() -> None:
        async with running_server() as srv:
            raw = await _raw(srv.port, request_bytes)
            assert raw.startswith(b"HTTP/1.1 400 "), raw[:80]

    run(scenario)
