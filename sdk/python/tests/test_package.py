"""The package installs with pip, type-checks strictly, and retries only
what is safe to retry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import leasehold
from leasehold import Client

SDK = Path(__file__).resolve().parents[1]


def test_pip_installs_it(tmp_path: Path) -> None:
    # from a copy: a build leaves its droppings (build/, *.egg-info) beside the sources
    source = tmp_path / "sdk"
    shutil.copytree(SDK, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info", ".*cache"))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--target", str(target), str(source)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import leasehold, leasehold.mcp; print(leasehold.__file__)"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(target))
    assert (target / "leasehold" / "py.typed").exists()
    assert (target / "bin" / "leasehold-mcp").exists(), "the gateway's command is installed"


def test_mypy_strict_passes() -> None:
    from mypy import api
    out, err, status = api.run(["--strict", "--no-incremental", "--cache-dir", os.devnull, str(SDK / "src" / "leasehold")])
    assert status == 0, out + err


def answers(*replies: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    it = iter(replies)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(it)

    return httpx.MockTransport(handle), seen


def err(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after else {}
    return httpx.Response(status, json={"error": {"code": code, "message": code}}, headers=headers)


TASK = {"task_id": "task_0", "workload": "w", "state": "open", "purpose": "p", "on_behalf_of": "u",
        "prompt_sha256": "0" * 64, "tools": [], "created_at": "t", "expires_at": "t", "lease_count": 0}


def test_load_is_retried_honouring_retry_after_and_decisions_are_not() -> None:
    transport, seen = answers(err(429, "rate_limited", "1"), err(503, "overloaded", "0"), httpx.Response(201, json=TASK))
    with Client("http://broker", token="t", transport=transport) as c:
        started = time.monotonic()
        t = c.open_task(purpose="p", on_behalf_of="u", ttl_seconds=60)
        assert t.id == "task_0" and len(seen) == 3
        assert 0.9 < time.monotonic() - started < 5, "waited what Retry-After said"
        assert seen[0].headers["authorization"] == "Bearer t"
    for decision in (err(403, "policy_denied"), err(429, "task_lease_cap"), err(400, "invalid_request"),
                     err(409, "task_completed")):
        transport, seen = answers(decision, httpx.Response(201, json=TASK))
        with Client("http://broker", token="t", transport=transport) as c:
            with pytest.raises(leasehold.LeaseholdError):
                c.open_task(purpose="p", on_behalf_of="u", ttl_seconds=60)
            assert len(seen) == 1, f"{decision.status_code} must not be retried"
    # retries are bounded
    transport, seen = answers(*[err(503, "overloaded", "0")] * 3)
    with Client("http://broker", token="t", transport=transport, max_retries=2) as c:
        with pytest.raises(leasehold.Unavailable):
            c.open_task(purpose="p", on_behalf_of="u", ttl_seconds=60)
        assert len(seen) == 3


def test_a_post_that_may_have_arrived_is_not_repeated() -> None:
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("no answer", request=request)

    with Client("http://broker", token="t", transport=httpx.MockTransport(handle), backoff_seconds=0.01) as c:
        with pytest.raises(leasehold.Unreachable):
            c.open_task(purpose="p", on_behalf_of="u", ttl_seconds=60)
        assert len(calls) == 1
        calls.clear()
        with pytest.raises(leasehold.Unreachable):
            c.get_task("task_0")  # a GET is safe to repeat
        assert len(calls) == 4


def test_tls_is_verified_and_a_private_ca_can_be_trusted(tmp_path: Path) -> None:
    """Against an HTTPS stand-in with the repository's test certificate
    (for localhost, signed by a test CA no system trusts)."""
    import http.server
    import json as _json
    import ssl
    import threading

    fixtures = SDK.parents[1] / "integration" / "fixtures" / "tls"

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            body = _json.dumps(TASK).encode()
            self.send_response(201)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(fixtures / "server.pem", fixtures / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://localhost:{server.server_address[1]}"
    try:
        # verification is on: the unknown CA is refused, nothing is sent
        with Client(url, token="t", max_retries=0) as c:
            with pytest.raises(leasehold.Unreachable) as e:
                c.open_task(purpose="p", on_behalf_of="u", ttl_seconds=60)
            assert "certificate" in e.value.message.lower() or "ssl" in e.value.message.lower(), e.value.message
        # trusting the private CA
        with Client(url, token="t", ca_file=fixtures / "ca.pem") as c:
            assert c.open_task(purpose="p", on_behalf_of="u", ttl_seconds=60).id == "task_0"
        with pytest.raises(ValueError):
            Client(url, token="t", ca_file=fixtures / "ca.pem", verify=False)
    finally:
        server.shutdown()
