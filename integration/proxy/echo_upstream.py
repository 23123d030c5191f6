"""A stand-in API for trying `leasehold proxy` by hand: answers every
request with the method, path and headers it received, as JSON (so the
credential the proxy injected comes back, and the proxy redacts it).

    python3 integration/proxy/echo_upstream.py 127.0.0.1:7720

Standard library only; loopback only.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {"method": self.command, "path": self.path, "headers": dict(self.headers.items())}, indent=2
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"echo: {self.command} {self.path}\n")


def main() -> None:
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7720").rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit("echo_upstream listens on loopback only")
    ThreadingHTTPServer((host, int(port)), Echo).serve_forever()


if __name__ == "__main__":
    main()
