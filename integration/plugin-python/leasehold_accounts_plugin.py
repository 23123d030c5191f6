#!/usr/bin/env python3
"""A leasehold provider plugin written in Python (grpcio): the protocol is
language neutral, and this plugin passes `leasehold providers conformance`.

It leases accounts of an internal service whose account table is a SQLite
database (the service checks API keys against it: `probe` does exactly
that). One account per lease, named `lh_<lease id>`, with a random API key
of which only a SHA-256 is stored; revocation deletes the account
(idempotent); rollback deletes by the lease id alone.

The broker starts it from a catalog entry:

    [providers.accounts]
    type = "plugin"
    command = "/opt/leasehold/plugins/leasehold_accounts_plugin.py"
    args = ["--proto", "/opt/leasehold/proto"]
    sha256 = "<sha256sum of this file>"
    env = { PATH = "/opt/leasehold/venv/bin:/usr/bin:/bin" }
    [providers.accounts.config]
    database = "/var/lib/accounts/accounts.sqlite"
    [providers.accounts.config.roles.analyst]
    max_ttl_seconds = 900
    scopes = ["sales", "support"]

`--proto` is the folder holding leasehold/plugin/v1/provider.proto; the
Python stubs are generated from it at start (grpcio-tools), into the
plugin's private working directory.

`--misbehave MODE` exists for leasehold's own tests of the broker's side:
hang-handshake, garbage, wrong-lease-id, hang-issue.
"""

import argparse
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import sys
import threading
import time
from concurrent import futures

PREFIX = "lh_"
PROTOCOL = 1


def generate_stubs(proto_root):
    from grpc_tools import protoc

    out = os.path.join(os.getcwd(), "stubs")
    os.makedirs(out, exist_ok=True)
    rel = "leasehold/plugin/v1/provider.proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(proto_root, rel),
        ]
    )
    if rc != 0:
        raise SystemExit(f"generating the protocol stubs from {proto_root} failed ({rc})")
    sys.path.insert(0, out)
    from leasehold.plugin.v1 import provider_pb2, provider_pb2_grpc

    return provider_pb2, provider_pb2_grpc


def log(msg):
    # stderr goes to the broker's log: never a key
    print(f"accounts-plugin: {msg}", file=sys.stderr, flush=True)


def watch_stdin():
    # the broker holds stdin open; its end means the broker is gone
    sys.stdin.buffer.read()
    os._exit(0)


class Accounts:
    """The internal service's account table."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        with self.db() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS accounts (name TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL, "
                "role TEXT NOT NULL, scopes TEXT NOT NULL, expires_at_ms INTEGER NOT NULL)"
            )

    def db(self):
        return sqlite3.connect(self.path, timeout=5, isolation_level=None)

    def create(self, name, key, role, scopes, expires_at_ms):
        digest = hashlib.sha256(key.encode()).hexdigest()
        with self.lock, self.db() as c:
            c.execute(
                "INSERT INTO accounts VALUES (?, ?, ?, ?, ?)",
                (name, digest, role, json.dumps(scopes), expires_at_ms),
            )

    def delete(self, names):
        with self.lock, self.db() as c:
            c.executemany("DELETE FROM accounts WHERE name = ?", [(n,) for n in names])

    def check(self, name, key, now_ms):
        with self.db() as c:
            row = c.execute(
                "SELECT key_sha256, expires_at_ms FROM accounts WHERE name = ?", (name,)
            ).fetchone()
        if row is None or row[1] <= now_ms:
            return False
        return secrets.compare_digest(row[0], hashlib.sha256(key.encode()).hexdigest())

    def names(self):
        with self.db() as c:
            return [r[0] for r in c.execute("SELECT name FROM accounts ORDER BY name")]


def is_lease_id(s):
    return len(s) == 32 and s.startswith("lease_") and all(ch.isalnum() or ch == "_" for ch in s)


def serve(pb, pb_grpc, socket_path, misbehave):
    import grpc

    def error(cls, message):
        return pb.Error(**{"class": cls, "message": message})

    INVALID = pb.Error.Class.INVALID
    PERMANENT = pb.Error.Class.PERMANENT
    RETRYABLE = pb.Error.Class.RETRYABLE

    class Provider(pb_grpc.ProviderServicer):
        def __init__(self):
            self.config = None
            self.accounts = None

        def _role(self, name):
            roles = self.config["roles"]
            if name not in roles:
                return None, error(INVALID, f"no role `{name}`; configured: {', '.join(sorted(roles))}")
            return roles[name], None

        def _scopes(self, role_name, role, asked):
            allowed = role.get("scopes", [])
            if not asked:
                return list(allowed), None
            for s in asked:
                if s not in allowed:
                    return None, error(INVALID, f"scope `{s!r}` is not allowed for role `{role_name}`")
            return list(asked), None

        def Handshake(self, request, context):
            if PROTOCOL not in request.protocol_versions:
                return pb.HandshakeResponse(
                    protocol_version=PROTOCOL,
                    error=error(PERMANENT, f"this plugin speaks protocol {PROTOCOL}"),
                )
            try:
                config = json.loads(request.config_json)
                roles = config["roles"]
                database = config["database"]
                for name, r in roles.items():
                    ttl = int(r["max_ttl_seconds"])
                    if ttl <= 0 or ttl > request.limits.max_lease_ttl_seconds:
                        raise ValueError(f"roles.{name}.max_ttl_seconds is out of range")
            except (KeyError, ValueError, TypeError) as e:
                return pb.HandshakeResponse(
                    protocol_version=PROTOCOL, error=error(INVALID, f"configuration: {e}")
                )
            self.config = config
            self.accounts = Accounts(database)
            log(f"configured as `{request.provider_name}` with {len(roles)} role(s)")
            return pb.HandshakeResponse(
                protocol_version=PROTOCOL, plugin="leasehold-accounts-plugin", version="0.1.0"
            )

        def Describe(self, request, context):
            return pb.DescribeResponse(
                kind="accounts",
                roles=[
                    pb.Role(
                        name=n,
                        max_ttl_seconds=int(r["max_ttl_seconds"]),
                        description=r.get("description", ""),
                        scopes=r.get("scopes", []),
                    )
                    for n, r in sorted(self.config["roles"].items())
                ],
                revocation="the account is deleted from the service's table",
                revocable=True,
                inventory=True,
            )

        def Validate(self, request, context):
            role, err = self._role(request.role)
            if err:
                return pb.ValidateResponse(error=err)
            _, err = self._scopes(request.role, role, list(request.scope))
            if err:
                return pb.ValidateResponse(error=err)
            return pb.ValidateResponse(max_ttl_seconds=int(role["max_ttl_seconds"]))

        def Health(self, request, context):
            try:
                self.accounts.names()
            except sqlite3.Error as e:
                return pb.Outcome(error=error(RETRYABLE, f"account table: {e}"))
            return pb.Outcome()

        def Prepare(self, request, context):
            return pb.PrepareResponse()

        def Issue(self, request, context):
            if misbehave == "hang-issue":
                time.sleep(3600)
            role, err = self._role(request.role)
            if err:
                return pb.IssueResponse(lease_id=request.lease_id, error=err)
            scopes, err = self._scopes(request.role, role, list(request.scope))
            if err:
                return pb.IssueResponse(lease_id=request.lease_id, error=err)
            if not is_lease_id(request.lease_id):
                return pb.IssueResponse(lease_id=request.lease_id, error=error(INVALID, "not a lease id"))
            lease_id = request.lease_id
            if misbehave == "wrong-lease-id":
                lease_id = "lease_" + "Z" * 26
            ceiling = request.issued_at_ms + int(role["max_ttl_seconds"]) * 1000
            expires = min(request.expires_at_ms, ceiling)
            key = secrets.token_urlsafe(32)
            name = PREFIX + lease_id
            try:
                self.accounts.create(name, key, request.role, scopes, expires)
            except sqlite3.Error as e:
                return pb.IssueResponse(lease_id=request.lease_id, error=error(RETRYABLE, f"account table: {e}"))
            return pb.IssueResponse(
                lease_id=lease_id,
                credential=[
                    pb.CredentialField(name="account", value=name, secret=False),
                    pb.CredentialField(name="api_key", value=key, secret=True),
                ],
                handle=name.encode(),
                expires_at_ms=expires,
                description=f"account {name} ({', '.join(scopes) or 'no scope'})",
            )

        def Revoke(self, request, context):
            results = []
            names = []
            for lease in request.leases:
                name = lease.handle.decode("utf-8", "replace")
                if not name.startswith(PREFIX):
                    results.append(pb.NotedOutcome(error=error(PERMANENT, "malformed handle")))
                else:
                    names.append(name)
                    results.append(pb.NotedOutcome())
            try:
                self.accounts.delete(names)
            except sqlite3.Error as e:
                return pb.RevokeResponse(
                    results=[pb.NotedOutcome(error=error(RETRYABLE, f"account table: {e}")) for _ in request.leases]
                )
            return pb.RevokeResponse(results=results)

        def Rollback(self, request, context):
            if not is_lease_id(request.lease_id):
                return pb.NotedOutcome(error=error(INVALID, "not a lease id"))
            self.accounts.delete([PREFIX + request.lease_id])
            return pb.NotedOutcome()

        def Inventory(self, request, context):
            found = []
            for n in self.accounts.names():
                if n.startswith(PREFIX):
                    rest = n[len(PREFIX):]
                    found.append(pb.Found(name=n, lease_id=rest if is_lease_id(rest) else None))
            return pb.InventoryResponse(supported=True, found=found)

        def Remove(self, request, context):
            if not request.name.startswith(PREFIX):
                return pb.Outcome(error=error(INVALID, f"`{request.name}` is not ours"))
            self.accounts.delete([request.name])
            return pb.Outcome()

        def Probe(self, request, context):
            fields = {f.name: f.value for f in request.credential}
            ok = self.accounts.check(
                fields.get("account", ""), fields.get("api_key", ""), int(time.time() * 1000)
            )
            return pb.ProbeResponse(supported=True, usable=ok)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ProviderServicer_to_server(Provider(), server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    print(f"leasehold-plugin|{PROTOCOL}|unix|{socket_path}", flush=True)
    server.wait_for_termination()


def serve_garbage(socket_path):
    # prints a valid handshake line, then answers anything with bytes that
    # are not HTTP/2
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(socket_path)
    s.listen(16)
    print(f"leasehold-plugin|{PROTOCOL}|unix|{socket_path}", flush=True)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"HTTP/1.0 200 OK\r\n\r\nthis is not gRPC\n" * 4)
        finally:
            c.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proto", required=True, help="the folder holding leasehold/plugin/v1/provider.proto")
    p.add_argument("--misbehave", choices=["hang-handshake", "garbage", "wrong-lease-id", "hang-issue"])
    args = p.parse_args()
    socket_path = os.environ.get("LEASEHOLD_PLUGIN_SOCKET")
    if not socket_path:
        print("this is a leasehold provider plugin: the broker starts it (type = \"plugin\")", file=sys.stderr)
        return 2
    threading.Thread(target=watch_stdin, daemon=True).start()
    if args.misbehave == "hang-handshake":
        time.sleep(3600)
        return 1
    if args.misbehave == "garbage":
        serve_garbage(socket_path)
        return 1
    pb, pb_grpc = generate_stubs(args.proto)
    serve(pb, pb_grpc, socket_path, args.misbehave)
    return 0


if __name__ == "__main__":
    sys.exit(main())
