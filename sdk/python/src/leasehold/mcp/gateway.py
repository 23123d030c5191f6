"""`leasehold-mcp`: an MCP server (stdio or streamable HTTP) in front of
tools, every call of which the broker decides.

* One MCP session is one task: opened at the session's first request after
  `initialize` (purpose and user from the configuration, else from the
  client's `initialize` `_meta`: `leasehold/purpose`,
  `leasehold/on_behalf_of`, and optionally `leasehold/tools` to narrow the
  tools), completed, every lease revoked, when the session ends (stdin
  closes, the HTTP session is deleted or idles out, the client goes away).
* `tools/list` lists the tools the task declared.
* `tools/call` is a broker call: allowed, the gateway leases the credential,
  runs the tool with it injected (environment, header or argument) and
  returns only the tool's result, with the credential's values redacted
  from it; approval required, it tells the client it waits (a log message,
  and progress if asked for) and waits, bounded; denied, a tool error with
  the policy's reasons.
* The client's own credentials are never passed upstream (MCP
  authorization): upstream calls carry only the leased credential.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import string
import sys
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Optional

import anyio
import httpx
import mcp.types as types
from mcp.server.lowlevel import NotificationOptions, Server

from .. import errors
from ..client import AsyncClient, AsyncTask
from ..models import Credential
from . import config as cfgmod

log = logging.getLogger("leasehold.mcp")

REDACTED = "[redacted by leasehold]"


class ToolFailure(Exception):
    """A tool call that failed; the message goes to the client."""


@dataclass
class Session:
    """One MCP session's task."""

    task: Optional[AsyncTask] = None
    declared: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def fill(template: str, values: dict[str, Any], quote: bool = False) -> str:
    """A `{name}` template over `values` (URL-quoted when `quote`)."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        if name not in values:
            raise ToolFailure(f"the template needs `{name}`, which the call did not give")
        v = values[name]
        text = v if isinstance(v, str) else json.dumps(v)
        out.append(urllib.parse.quote(text, safe="") if quote else text)
    return "".join(out)


def redact(text: str, values: list[str]) -> str:
    """Take the credential's values out of a tool's output. The broker's
    answer does not say which fields are secret, so every value long enough
    to be one is taken out (a public one, like an audience, costs nothing);
    short ones (`Bearer`) cannot be a secret."""
    for v in sorted(values, key=len, reverse=True):
        if len(v) >= 8:
            text = text.replace(v, REDACTED)
    return text


class Gateway:
    def __init__(self, cfg: cfgmod.GatewayConfig, client: AsyncClient) -> None:
        self.cfg = cfg
        self.client = client
        self.tools = {t.name: t for t in cfg.tools}
        self.server: Server[Session, Any] = Server("leasehold-mcp", lifespan=self._lifespan)
        self.server.list_tools()(self._list_tools)  # type: ignore[no-untyped-call]  # mcp 1.x is untyped here
        self.server.call_tool(validate_input=True)(self._call_tool)

    # --- the session's task ---

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Server[Session, Any]) -> AsyncIterator[Session]:
        session = Session()
        try:
            yield session
        finally:
            if session.task is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        done = await session.task.complete()
                        log.info("session ended: task %s completed, %d leases revoked", done.task_id, len(done.revoked))
                    except errors.LeaseholdError as e:
                        log.error("session ended: completing task %s failed: %s (its leases die at its deadline)",
                                  session.task.id, e)

    def _client_meta(self) -> dict[str, Any]:
        ctx = self.server.request_context
        params = ctx.session.client_params
        meta = params.meta if params is not None else None
        return dict(meta.model_extra or {}) if meta is not None else {}

    async def _task(self) -> tuple[Session, AsyncTask]:
        session: Session = self.server.request_context.lifespan_context
        async with session.lock:
            if session.task is None:
                meta = self._client_meta()
                purpose = self.cfg.task.purpose or meta.get("leasehold/purpose")
                user = self.cfg.task.on_behalf_of or meta.get("leasehold/on_behalf_of")
                if not isinstance(purpose, str) or not isinstance(user, str):
                    raise ToolFailure("no task: configure task.purpose and task.on_behalf_of, or send "
                                      "`leasehold/purpose` and `leasehold/on_behalf_of` in initialize's _meta")
                wanted = meta.get("leasehold/tools")
                names = [n for n in self.tools if not isinstance(wanted, list) or n in wanted]
                info = self.server.request_context.session.client_params
                prompt = f"MCP session of {info.clientInfo.name} {info.clientInfo.version}" if info else "MCP session"
                session.task = await self.client.open_task(
                    purpose=purpose, on_behalf_of=user, ttl_seconds=self.cfg.task.ttl_seconds, prompt=prompt,
                    tools=sorted({self.tools[n].broker_tool for n in names}),
                )
                session.declared = set(names)
                log.info("session task %s opened for %s", session.task.id, user)
            return session, session.task

    # --- MCP handlers ---

    async def _list_tools(self) -> list[types.Tool]:
        try:
            session, _ = await self._task()
        except (ToolFailure, errors.LeaseholdError) as e:
            raise ValueError(str(e)) from None
        return [
            types.Tool(name=t.name, description=t.description, inputSchema=t.input_schema)
            for t in self.cfg.tools
            if t.name in session.declared
        ]

    async def _call_tool(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        try:
            text = await self._run(name, arguments)
            return types.CallToolResult(content=[types.TextContent(type="text", text=text)])
        except (ToolFailure, errors.LeaseholdError) as e:
            return types.CallToolResult(content=[types.TextContent(type="text", text=describe(e))], isError=True)

    async def _run(self, name: str, arguments: dict[str, Any]) -> str:
        tool = self.tools.get(name)
        session, task = await self._task()
        if tool is None or name not in session.declared:
            raise ToolFailure(f"no tool `{name}` in this session")
        resource = fill(tool.resource, arguments)
        cred = tool.credential.model_dump() if tool.credential else None
        try:
            result = await task.call(tool.broker_tool, tool.action, resource, arguments=arguments, credential=cred)
        except errors.ApprovalRequired as e:
            await self._tell_waiting(e)
            await task.wait_for_approval(e.approval_id, timeout=self.cfg.task.approval_wait_seconds)
            result = await task.call(tool.broker_tool, tool.action, resource, arguments=arguments,
                                     credential=cred, approval_id=e.approval_id)
        credential = result.lease.credential if result.lease else None
        secrets = [credential.reveal(f) for f in credential.fields] if credential else []
        try:
            out = await asyncio.wait_for(self._execute(tool, arguments, credential), tool.timeout_seconds)
        except asyncio.TimeoutError:
            raise ToolFailure(f"`{name}` did not finish within {tool.timeout_seconds:g}s") from None
        except ToolFailure as e:
            raise ToolFailure(redact(str(e), secrets)) from None
        return redact(out, secrets)

    async def _tell_waiting(self, e: errors.ApprovalRequired) -> None:
        ctx = self.server.request_context
        message = (f"waiting for a human approval ({e.approval_id}, policies {', '.join(e.policies)}); "
                   f"up to {self.cfg.task.approval_wait_seconds:g}s")
        with contextlib.suppress(Exception):
            await ctx.session.send_log_message(level="info", data=message, logger="leasehold",
                                               related_request_id=ctx.request_id)
            token = ctx.meta.progressToken if ctx.meta else None
            if token is not None:
                await ctx.session.send_progress_notification(token, 0, None, message=message,
                                                             related_request_id=str(ctx.request_id))

    # --- running the tool ---

    async def _execute(self, tool: cfgmod.Tool, arguments: dict[str, Any], credential: Optional[Credential]) -> str:
        values = {f: credential.reveal(f) for f in credential.fields} if credential else {}
        injected = fill(tool.inject.value, values) if tool.inject and credential else None
        args = dict(arguments)
        env: dict[str, str] = {}
        headers: dict[str, str] = {}
        if tool.inject is not None and injected is not None:
            if tool.inject.into == "env":
                env[tool.inject.name] = injected
            elif tool.inject.into == "header":
                headers[tool.inject.name] = injected
            else:
                args[tool.inject.name] = injected
        if tool.command is not None:
            return await run_command([fill(a, args) for a in tool.command], env)
        if tool.http is not None:
            return await run_http(tool.http, fill(tool.http.url, args, quote=True), arguments, headers, self.client)
        assert tool.upstream is not None
        return await run_upstream(tool.upstream, tool.upstream.tool or tool.name, args, env, headers)


async def run_command(argv: list[str], env: dict[str, str]) -> str:
    # no shell: arguments are argv elements, never parsed
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**minimal_env(), **env},
    )
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise ToolFailure(f"the tool exited with {proc.returncode}: {err.decode(errors='replace')[-1000:]}")
    return out.decode(errors="replace")


def minimal_env() -> dict[str, str]:
    """What a tool's process inherits: not the gateway's own secrets."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "SSL_CERT_FILE")
    return {k: v for k, v in os.environ.items() if k in keep}


async def run_http(http: cfgmod.Http, url: str, arguments: dict[str, Any], headers: dict[str, str],
                   client: AsyncClient) -> str:
    async with httpx.AsyncClient(timeout=http.timeout_seconds, follow_redirects=False) as h:
        try:
            resp = await h.request(http.method, url, headers=headers, json=arguments if http.json_body else None)
        except httpx.HTTPError as e:
            raise ToolFailure(f"the tool's endpoint did not answer: {type(e).__name__}") from None
    if resp.status_code >= 400:
        raise ToolFailure(f"the tool's endpoint answered {resp.status_code}: {resp.text[:1000]}")
    return resp.text


async def run_upstream(up: cfgmod.Upstream, name: str, arguments: dict[str, Any], env: dict[str, str],
                       headers: dict[str, str]) -> str:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from mcp.client.streamable_http import streamable_http_client

    async def call(session: ClientSession) -> str:
        await session.initialize()
        result = await session.call_tool(name, arguments)
        text = "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))
        if result.isError:
            raise ToolFailure(f"the upstream tool failed: {text[:1000]}")
        return text

    if up.command is not None:
        params = StdioServerParameters(command=up.command[0], args=up.command[1:], env={**minimal_env(), **env})
        async with stdio_client(params, errlog=sys.stderr) as (r, w), ClientSession(r, w) as s:
            return await call(s)
    assert up.url is not None
    # the leased credential is the only credential this connection carries
    http = httpx.AsyncClient(headers=headers, timeout=up.timeout_seconds, follow_redirects=False)
    async with http, streamable_http_client(up.url, http_client=http) as (r, w, _), ClientSession(r, w) as s:
        return await call(s)


def describe(e: Exception) -> str:
    """A refusal as the MCP client reads it (never a credential: there is
    none in an error)."""
    if isinstance(e, errors.PolicyDenied):
        return "denied by policy: " + "; ".join(e.reasons)
    if isinstance(e, errors.ApprovalDenied):
        return f"an approver denied the call ({e.approval_id}): {e.comment or 'no comment'}"
    if isinstance(e, errors.ApprovalTimeout):
        return f"no approver decided in time ({e.approval_id}); ask again later"
    if isinstance(e, errors.ApprovalExpired):
        return f"the approval {e.approval_id} is {e.state}"
    if isinstance(e, errors.LeaseholdError):
        return f"the broker refused the call: {e.code}: {e.message}"
    return str(e)


async def check_broker(cfg: cfgmod.GatewayConfig, client: AsyncClient) -> None:
    """Before serving: the token signs in, and every tool's credential
    names a provider and role the broker has."""
    try:
        who = await client.whoami()
    except errors.Unauthenticated as e:
        raise cfgmod.ConfigError(f"the broker refused the workload token ({cfg.broker.token_file}): {e.message}") from None
    except errors.LeaseholdError as e:
        raise cfgmod.ConfigError(f"the broker at {cfg.broker.url} cannot be used: {e}") from None
    if who.kind != "workload":
        raise cfgmod.ConfigError(f"broker.token_file holds an operator token ({who.id}); the gateway needs a workload's")
    roles = {(p.name, r.name) for p in await client.providers() for r in p.roles}
    for t in cfg.tools:
        if t.credential and (t.credential.provider, t.credential.role) not in roles:
            raise cfgmod.ConfigError(
                f"tools.{t.name}.credential: the broker has no role `{t.credential.role}` of provider "
                f"`{t.credential.provider}`")
    log.info("serving as %s with %d tools", who.id, len(cfg.tools))


async def serve_stdio(gw: Gateway) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (r, w):
        await gw.server.run(r, w, gw.server.create_initialization_options(NotificationOptions()))


async def serve_http(gw: Gateway, host: str, port: int) -> None:
    import uvicorn
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send

    manager = StreamableHTTPSessionManager(app=gw.server, stateless=False, session_idle_timeout=1800)

    class Endpoint:
        """`/mcp` itself (an ASGI app, so Starlette neither wraps nor redirects it)."""

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    app = Starlette(routes=[Route("/mcp", endpoint=Endpoint(), methods=["GET", "POST", "DELETE"])],
                    lifespan=lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    await server.serve()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="leasehold-mcp",
        description="An MCP gateway: every tools/call is decided by the leasehold broker, and a tool runs with a "
                    "credential leased for this session's task, which the client never sees.")
    ap.add_argument("--config", required=True, help="the gateway's TOML file")
    ap.add_argument("--http", metavar="HOST:PORT",
                    help="serve streamable HTTP at http://HOST:PORT/mcp (loopback only) instead of stdio")
    ap.add_argument("--log-level", default=os.environ.get("LEASEHOLD_MCP_LOG", "info"))
    a = ap.parse_args(argv)
    # stdout is the MCP channel under stdio: logs go to stderr
    logging.basicConfig(stream=sys.stderr, level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its lines carry URLs, never needed at info
    try:
        cfg = cfgmod.load(a.config)
        host, port = parse_listen(a.http) if a.http else ("", 0)
        client = AsyncClient(cfg.broker.url, token_file=cfg.broker.token_file, ca_file=cfg.broker.ca_file)
    except (cfgmod.ConfigError, errors.LeaseholdError, ValueError) as e:
        print(f"leasehold-mcp: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        await check_broker(cfg, client)
        gw = Gateway(cfg, client)
        if a.http:
            await serve_http(gw, host, port)
        else:
            await serve_stdio(gw)

    try:
        anyio.run(run)
    except cfgmod.ConfigError as e:
        print(f"leasehold-mcp: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def parse_listen(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise cfgmod.ConfigError(f"--http {spec}: only a loopback address (the gateway does not authenticate MCP clients)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise cfgmod.ConfigError(f"--http {spec}: not a port")
    return host, int(port)
