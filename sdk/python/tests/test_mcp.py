"""The MCP gateway with the official MCP Python SDK as the client, over stdio
and streamable HTTP, in front of a real `leasehold dev`.

The tools' stand-in upstream (an HTTP service in this process) accepts a
request only with a token the broker's introspection says is active, and
records every token it is sent, so the tests can search every byte the MCP
client received for them, and check they die when the session ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession, types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from conftest import Broker, free_port

SRC = Path(__file__).resolve().parents[1] / "src"


class Upstream:
    """The tools' service: checks each bearer token by introspection."""

    def __init__(self, broker: Broker) -> None:
        self.tokens: list[str] = []
        self.lease_ids: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def answer(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def serve(self) -> None:
                auth = self.headers.get("authorization", "")
                token = auth.removeprefix("Bearer ")
                if not token or token == auth:
                    return self.answer(401, "no bearer token")
                outer.tokens.append(token)
                info = broker.introspect(token)
                if not info["active"]:
                    return self.answer(401, "inactive token")
                outer.lease_ids.append(info["jti"])
                if self.path.startswith("/echo"):
                    # a careless service that repeats what it was sent
                    return self.answer(200, f"you sent {auth}; scope {info['scope']}")
                return self.answer(200, f"{self.command} {self.path} as {info['sub']} for {info['act']['sub']}")

            do_GET = do_POST = serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def mcp_upstream(upstream: Upstream, tmp_path: Path) -> Any:
    """The directory's MCP server over streamable HTTP, on a free port."""
    script = tmp_path / "upstream_http.py"
    script.write_text(UPSTREAM_MCP)
    port = free_port()
    log = open(tmp_path / "upstream-http.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), upstream.url, str(port)], stdout=log, stderr=log,
                            env=gateway_env())
    url = f"http://127.0.0.1:{port}/mcp"
    for _ in range(200):
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None, (tmp_path / "upstream-http.log").read_text()
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture()
def upstream(broker: Broker) -> Any:
    u = Upstream(broker)
    yield u
    u.close()


WRITE_SCRIPT = """
import os, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/tickets/" + sys.argv[2], method="POST",
                             headers={"authorization": "Bearer " + os.environ["TICKETS_TOKEN"]})
print(urllib.request.urlopen(req).read().decode())
"""

UPSTREAM_MCP = """
import os, sys, urllib.request
from mcp.server.fastmcp import Context, FastMCP
http = len(sys.argv) > 2
mcp = FastMCP("upstream", port=int(sys.argv[2]) if http else 8000)

@mcp.tool()
def lookup(user: str, ctx: Context, token: str = "") -> str:
    # the credential: an argument, in the environment over stdio, in a header over HTTP
    if token:
        auth = "Bearer " + token
    elif http:
        auth = ctx.request_context.request.headers["authorization"]
    else:
        auth = "Bearer " + os.environ["DIRECTORY_TOKEN"]
    req = urllib.request.Request(sys.argv[1] + "/users/" + user, headers={"authorization": auth})
    return "directory says: " + urllib.request.urlopen(req).read().decode()

mcp.run("streamable-http" if http else "stdio")
"""


def write_config(broker: Broker, upstream: Upstream, dir: Path, token_who: str = "assistant-b",
                 task: str = 'purpose = "mcp session"\non_behalf_of = "alice@example.com"\n',
                 mcp_url: str = "http://127.0.0.1:1/mcp") -> Path:
    (dir / "write_ticket.py").write_text(WRITE_SCRIPT)
    (dir / "upstream_mcp.py").write_text(UPSTREAM_MCP)
    token = broker.token_file(token_who, dir)
    py = json.dumps(sys.executable)
    cfg = dir / "gateway.toml"
    cfg.write_text(flush_left(f"""
        [broker]
        url = "{broker.url}"
        token_file = "{token.name}"

        [task]
        {task}
        ttl_seconds = 600
        approval_wait_seconds = 30

        [[tools]]
        name = "read_doc"
        description = "Read a document"
        input_schema = {{ type = "object", properties = {{ doc = {{ type = "string" }} }}, required = ["doc"] }}
        broker_tool = "demo.read"
        action = "read"
        resource = "doc:{{doc}}"
        credential = {{ provider = "token", role = "demo", ttl_seconds = 120 }}
        inject = {{ into = "header", name = "Authorization", value = "Bearer {{token}}" }}
        http = {{ url = "{upstream.url}/docs/{{doc}}" }}

        [[tools]]
        name = "echo"
        description = "A service that repeats its request"
        broker_tool = "demo.read"
        action = "read"
        resource = "echo"
        credential = {{ provider = "token", role = "demo", ttl_seconds = 120 }}
        inject = {{ into = "header", name = "Authorization", value = "Bearer {{token}}" }}
        http = {{ url = "{upstream.url}/echo" }}

        [[tools]]
        name = "write_ticket"
        description = "Update a ticket (a human approves each)"
        input_schema = {{ type = "object", properties = {{ ticket = {{ type = "string" }} }}, required = ["ticket"] }}
        broker_tool = "demo.write"
        action = "update"
        resource = "ticket:{{ticket}}"
        credential = {{ provider = "token", role = "demo", ttl_seconds = 120 }}
        inject = {{ into = "env", name = "TICKETS_TOKEN" }}
        command = [{py}, "write_ticket.py", "{upstream.url}", "{{ticket}}"]

        [[tools]]
        name = "restart_db"
        description = "Restart a database"
        broker_tool = "demo.admin"
        action = "restart"
        resource = "db:prod"
        command = ["true"]

        [[tools]]
        name = "lookup_user"
        description = "Ask the directory's MCP server"
        input_schema = {{ type = "object", properties = {{ user = {{ type = "string" }} }}, required = ["user"] }}
        broker_tool = "demo.read"
        action = "read"
        resource = "user:{{user}}"
        credential = {{ provider = "token", role = "demo", ttl_seconds = 120 }}
        inject = {{ into = "env", name = "DIRECTORY_TOKEN" }}
        upstream = {{ command = [{py}, "upstream_mcp.py", "{upstream.url}"], tool = "lookup" }}

        [[tools]]
        name = "lookup_user_arg"
        description = "Ask the directory's MCP server, the credential as an argument"
        input_schema = {{ type = "object", properties = {{ user = {{ type = "string" }} }}, required = ["user"] }}
        broker_tool = "demo.read"
        action = "read"
        resource = "user:{{user}}"
        credential = {{ provider = "token", role = "demo", ttl_seconds = 120 }}
        inject = {{ into = "argument", name = "token" }}
        upstream = {{ command = [{py}, "upstream_mcp.py", "{upstream.url}"], tool = "lookup" }}

        [[tools]]
        name = "lookup_user_http"
        description = "Ask the directory's MCP server over HTTP"
        input_schema = {{ type = "object", properties = {{ user = {{ type = "string" }} }}, required = ["user"] }}
        broker_tool = "demo.read"
        action = "read"
        resource = "user:{{user}}"
        credential = {{ provider = "token", role = "demo", ttl_seconds = 120 }}
        inject = {{ into = "header", name = "Authorization", value = "Bearer {{token}}" }}
        upstream = {{ url = "{mcp_url}", tool = "lookup" }}
    """))
    # the tools' commands run in the config's folder
    return cfg


def flush_left(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines()) + "\n"


def gateway_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC)}


class Approver:
    """Approves the gateway's pending requests, as a human would."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.approved: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            for a in self.broker.as_operator("approver", "GET", "/v1/approvals")["approvals"]:
                if a["workload"] == "dev:assistant-b" and a["approval_id"] not in self.approved:
                    time.sleep(0.3)
                    self.broker.as_operator("approver", "POST", f"/v1/approvals/{a['approval_id']}/approve",
                                            {"comment": "ok"})
                    self.approved.append(a["approval_id"])
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def text_of(r: types.CallToolResult) -> str:
    return "\n".join(c.text for c in r.content if isinstance(c, types.TextContent))


async def exercise(session: ClientSession, broker: Broker, logs: list[str]) -> None:
    """The same conversation over either transport."""
    await session.initialize()
    listed = {t.name for t in (await session.list_tools()).tools}
    assert listed == {"read_doc", "echo", "write_ticket", "restart_db", "lookup_user", "lookup_user_arg",
                      "lookup_user_http"}

    # allowed: the tool ran with the leased token, the model sees its result only
    r = await session.call_tool("read_doc", {"doc": "q3-report"})
    assert not r.isError, text_of(r)
    assert text_of(r) == "GET /docs/q3-report as dev:assistant-b for alice@example.com"
    # a service that echoes the credential: redacted before the client sees it
    r = await session.call_tool("echo", {})
    assert not r.isError, text_of(r)
    assert "you sent Bearer [redacted by leasehold]" in text_of(r), text_of(r)
    # through an upstream MCP server, the credential in its environment
    r = await session.call_tool("lookup_user", {"user": "bob"})
    assert not r.isError, text_of(r)
    assert "directory says: GET /users/bob as dev:assistant-b" in text_of(r)
    # the credential as an argument the gateway adds (the model never gives it)
    r = await session.call_tool("lookup_user_arg", {"user": "erin"})
    assert not r.isError, text_of(r)
    assert "directory says: GET /users/erin as dev:assistant-b" in text_of(r)
    # and one over streamable HTTP, the credential in a header
    r = await session.call_tool("lookup_user_http", {"user": "dave"})
    assert not r.isError, text_of(r)
    assert "directory says: GET /users/dave as dev:assistant-b" in text_of(r)

    # approval: the client is told it waits, then gets the result
    approver = Approver(broker)
    try:
        started = time.monotonic()
        r = await session.call_tool("write_ticket", {"ticket": "42"})
        assert not r.isError, text_of(r)
        assert text_of(r).strip() == "POST /tickets/42 as dev:assistant-b for alice@example.com"
        assert time.monotonic() - started >= 0.3
        assert approver.approved, "an approval was asked for and given"
    finally:
        approver.close()
    assert any("waiting for a human approval" in m for m in logs), logs

    # denied: a tool error with the policy's reason
    r = await session.call_tool("restart_db", {})
    assert r.isError
    assert "denied by policy" in text_of(r) and "break-glass" in text_of(r), text_of(r)

    # malformed calls are MCP errors, never a crash
    r = await session.call_tool("read_doc", {"doc": 7})
    assert r.isError and "validation" in text_of(r).lower(), text_of(r)
    r = await session.call_tool("no_such_tool", {})
    assert r.isError
    r = await session.call_tool("read_doc", {"doc": "after-errors"})
    assert not r.isError, text_of(r)


def assert_dead_and_unseen(broker: Broker, upstream: Upstream, received: bytes) -> None:
    assert upstream.tokens, "the tools were sent tokens"
    for token in set(upstream.tokens):
        assert token.encode() not in received, "a credential reached the MCP client"
        assert token.split(".")[2].encode() not in received
    # the session's end completed the task: every lease revoked
    for lease in set(upstream.lease_ids):
        assert broker.as_operator("admin", "GET", f"/v1/leases/{lease}")["state"] == "revoked", lease
    for token in set(upstream.tokens):
        assert broker.introspect(token)["active"] is False


def test_over_stdio(broker: Broker, upstream: Upstream, mcp_upstream: str, tmp_path: Path) -> None:
    cfg = write_config(broker, upstream, tmp_path, mcp_url=mcp_upstream)
    raw = tmp_path / "stdout.bin"
    errlog = tmp_path / "gateway.log"
    logs: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(str(params.data))

    async def main() -> None:
        # every byte the gateway writes to the client, through tee
        cmd = f"{sys.executable} -m leasehold.mcp --config {cfg} --log-level debug | tee {raw}"
        params = StdioServerParameters(command="sh", args=["-c", cmd], env=gateway_env(), cwd=str(tmp_path))
        with open(errlog, "w") as err:
            async with stdio_client(params, errlog=err) as (r, w):
                async with ClientSession(r, w, logging_callback=on_log) as session:
                    await exercise(session, broker, logs)
        # the gateway completes the task as its stdin closes
        for _ in range(100):
            if all(broker.introspect(t)["active"] is False for t in set(upstream.tokens)):
                break
            await asyncio.sleep(0.1)

    asyncio.run(main())
    received = raw.read_bytes()
    assert b'"jsonrpc"' in received
    assert_dead_and_unseen(broker, upstream, received)
    log = errlog.read_text()
    assert "session task" in log and "completed" in log, log[-2000:]
    for token in set(upstream.tokens):
        assert token not in log, "a credential in the gateway's log"


class Recording(httpx.AsyncBaseTransport):
    """Keeps every byte of every answer the client receives."""

    def __init__(self, sink: bytearray) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sink = sink

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        sink = self.sink
        for k, v in resp.headers.raw:
            sink.extend(k + b": " + v + b"\n")
        inner_stream = resp.stream
        assert isinstance(inner_stream, httpx.AsyncByteStream)

        class Stream(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in inner_stream:
                    sink.extend(chunk)
                    yield chunk

            async def aclose(self) -> None:
                await inner_stream.aclose()

        return httpx.Response(resp.status_code, headers=resp.headers, stream=Stream(), extensions=resp.extensions)


@asynccontextmanager
async def http_gateway(cfg: Path, tmp: Path) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    errlog = open(tmp / "gateway-http.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "leasehold.mcp", "--config", str(cfg), "--http",
                             f"127.0.0.1:{port}"], env=gateway_env(), cwd=str(tmp), stdout=errlog, stderr=errlog)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        for _ in range(200):
            assert proc.poll() is None, (tmp / "gateway-http.log").read_text()
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        errlog.close()


def test_over_streamable_http(broker: Broker, upstream: Upstream, mcp_upstream: str, tmp_path: Path) -> None:
    cfg = write_config(broker, upstream, tmp_path, mcp_url=mcp_upstream)
    received = bytearray()
    logs: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(str(params.data))

    async def main() -> None:
        async with http_gateway(cfg, tmp_path) as (url, proc):
            http = httpx.AsyncClient(transport=Recording(received), timeout=httpx.Timeout(30, read=300))
            async with http, streamable_http_client(url, http_client=http) as (r, w, _):
                async with ClientSession(r, w, logging_callback=on_log) as session:
                    await exercise(session, broker, logs)
            # the client deleted its session: the gateway completed the task
            for _ in range(100):
                if all(broker.introspect(t)["active"] is False for t in set(upstream.tokens)):
                    break
                await asyncio.sleep(0.1)
            # and it still serves: garbage is a JSON-RPC error, not a crash
            bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json",
                                                                  "accept": "application/json, text/event-stream"})
            assert bad.status_code == 400 and "error" in bad.json(), bad.text
            assert proc.poll() is None

    asyncio.run(main())
    assert_dead_and_unseen(broker, upstream, bytes(received))


def sse_json(resp: httpx.Response) -> Any:
    if resp.headers.get("content-type", "").startswith("application/json"):
        return resp.json()
    data = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1])


def test_the_task_comes_from_the_clients_metadata_and_can_be_narrowed(broker: Broker, upstream: Upstream,
                                                                       tmp_path: Path) -> None:
    cfg = write_config(broker, upstream, tmp_path, task="")

    async def main() -> None:
        async with http_gateway(cfg, tmp_path) as (url, _):
            h = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
            async with httpx.AsyncClient(timeout=30) as c:
                init = await c.post(url, headers=h, json={
                    "jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                               "clientInfo": {"name": "raw-test", "version": "1"},
                               "_meta": {"leasehold/purpose": "triage from the client",
                                         "leasehold/on_behalf_of": "carol@example.com",
                                         "leasehold/tools": ["read_doc"]}}})
                assert init.status_code == 200, init.text
                h["mcp-session-id"] = init.headers["mcp-session-id"]
                h["mcp-protocol-version"] = "2025-11-25"
                await c.post(url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
                listed = sse_json(await c.post(url, headers=h, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
                assert [t["name"] for t in listed["result"]["tools"]] == ["read_doc"]
                called = sse_json(await c.post(url, headers=h, json={
                    "jsonrpc": "2.0", "id": 3, "method": "tools/call",
                    "params": {"name": "read_doc", "arguments": {"doc": "d"}}}))
                assert called["result"]["content"][0]["text"].endswith("for carol@example.com"), called
                other = sse_json(await c.post(url, headers=h, json={
                    "jsonrpc": "2.0", "id": 4, "method": "tools/call",
                    "params": {"name": "write_ticket", "arguments": {"ticket": "1"}}}))
                assert other["result"]["isError"] is True, other
                # a malformed request in a live session: an error answer
                broken = await c.post(url, headers=h, json={"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                                                            "params": {"arguments": 3}})
                body = sse_json(broken) if broken.status_code == 200 else broken.json()
                assert "error" in body, body
                await c.delete(url, headers=h)
        tasks = broker.as_operator("admin", "GET", "/v1/events?kind=task.opened&workload=dev:assistant-b")["events"]
        assert any(e["data"].get("purpose") == "triage from the client" for e in tasks), tasks

    asyncio.run(main())


def run_gateway(cfg: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leasehold.mcp", "--config", str(cfg)], env=gateway_env(),
                          cwd=str(tmp), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_bad_configuration_is_refused_at_start_naming_it(broker: Broker, upstream: Upstream, tmp_path: Path) -> None:
    cfg = write_config(broker, upstream, tmp_path)
    # no token file
    (tmp_path / "assistant-b.token").unlink()
    r = run_gateway(cfg, tmp_path)
    assert r.returncode == 2 and "cannot read the token file" in r.stderr, r.stderr
    # a token the broker refuses
    (tmp_path / "assistant-b.token").write_text("eyJhbGciOiJFZERTQSJ9.e30.c2ln")
    r = run_gateway(cfg, tmp_path)
    assert r.returncode == 2 and "refused the workload token" in r.stderr, r.stderr
    # an operator's token
    (tmp_path / "assistant-b.token").write_text(broker.tokens["admin"])
    r = run_gateway(cfg, tmp_path)
    assert r.returncode == 2 and "operator token" in r.stderr, r.stderr
    broker.token_file("assistant-b", tmp_path)
    # a credential of a provider or role the broker does not have
    text = cfg.read_text()
    cfg.write_text(text.replace('role = "demo", ttl_seconds = 120 }\ninject = { into = "env", name = "TICKETS_TOKEN"',
                                'role = "nope", ttl_seconds = 120 }\ninject = { into = "env", name = "TICKETS_TOKEN"'))
    r = run_gateway(cfg, tmp_path)
    assert r.returncode == 2 and "tools.write_ticket.credential" in r.stderr and "nope" in r.stderr, r.stderr
    # unknown keys, wrong injection, a bad template
    for broken, says in [
        (text + "\nsurprise = 1\n", "surprise"),
        (text.replace('inject = { into = "env", name = "TICKETS_TOKEN" }',
                      'inject = { into = "header", name = "X" }'), "takes its credential by"),
        (text.replace('resource = "doc:{doc}"', 'resource = "doc:{doc.x}"'), "not an argument name"),
    ]:
        cfg.write_text(broken)
        r = run_gateway(cfg, tmp_path)
        assert r.returncode == 2 and says in r.stderr, (says, r.stderr)
    cfg.write_text(text)
    r = subprocess.run([sys.executable, "-m", "leasehold.mcp", "--config", str(cfg), "--http", "0.0.0.0:9999"],
                       env=gateway_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "loopback" in r.stderr, r.stderr
    # no secret of the gateway's own in any of that
    assert broker.tokens["assistant-b"] not in r.stderr
    assert not re.search(r"eyJ[A-Za-z0-9_-]{20,}", r.stderr)
