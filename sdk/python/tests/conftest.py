"""A real `leasehold dev` per test session, on a free loopback port.

The broker binary comes from LEASEHOLD_BIN (the Rust test that runs this
suite sets it to the one it built; by hand: `cargo build`, then
LEASEHOLD_BIN=target/debug/leasehold). Without it the tests fail, saying so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest


@dataclass
class Broker:
    url: str
    data: Path
    tokens: dict[str, str]
    log: Path

    def token_file(self, who: str, dir: Path) -> Path:
        p = dir / f"{who}.token"
        p.write_text(self.tokens[who])
        return p

    def as_operator(self, who: str, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(method, self.url + path, json=body, headers={"authorization": f"Bearer {self.tokens[who]}"}, timeout=30)
        assert r.status_code < 300, f"{method} {path} as {who}: {r.status_code} {r.text}"
        return r.json()

    def introspect(self, token: str) -> dict[str, Any]:
        r = httpx.post(self.url + "/v1/introspect", data={"token": token},
                       headers={"authorization": f"Bearer {self.tokens['resource-server']}"}, timeout=30)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def leasehold_bin() -> str:
    path = os.environ.get("LEASEHOLD_BIN")
    if not path:
        pytest.fail("LEASEHOLD_BIN is not set: the path of a built `leasehold` binary "
                    "(cargo build; then LEASEHOLD_BIN=target/debug/leasehold)", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"LEASEHOLD_BIN={path} is not an executable", pytrace=False)
    return path


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    dir = tmp_path_factory.mktemp("broker")
    port = free_port()
    log = dir / "broker.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [leasehold_bin(), "dev", "--listen", f"127.0.0.1:{port}", "--data", str(dir / "data")],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RUST_LOG": "info"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail(f"leasehold dev exited: {log.read_text()[-2000:]}", pytrace=False)
            try:
                if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("leasehold dev did not become healthy", pytrace=False)
        creds = json.loads((dir / "data" / "dev-credentials.json").read_text())
        tokens = {name: ident["token"] for name, ident in creds["identities"].items()}
        yield Broker(url=url, data=dir / "data", tokens=tokens, log=log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
