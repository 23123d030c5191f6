"""An assistant process that reaches APIs only through `leasehold proxy`.

It signs in to the broker as its workload, opens a task, gets the task's
proxy credential, points Python's standard proxy settings at the proxy
(`HTTP_PROXY`, `HTTPS_PROXY`, `REQUESTS_CA_BUNDLE` for the proxy's local
CA) and calls each URL given with plain `requests`. It never handles an
API credential: the proxy injects one per call. `tests/broker/proxy.rs`
runs it, then searches its memory, its environment and every byte it
received for the credentials the APIs were sent.

Environment: LEASEHOLD_URL, LEASEHOLD_TOKEN_FILE, PROXY_ADDR, PROXY_CA,
OUT (where the received bytes go), CANARY (a value the parent must find in
this process's memory, so a search that finds nothing means something).
"""

from __future__ import annotations

import json
import os
import sys

import requests

from leasehold import Client


def main(urls: list[str]) -> int:
    client = Client(os.environ["LEASEHOLD_URL"], token_file=os.environ["LEASEHOLD_TOKEN_FILE"])
    canary = "-".join(["canary", os.environ["CANARY"]])
    task = client.open_task(
        purpose="summarize the report through the proxy",
        on_behalf_of="alice@example.com",
        prompt="Summarize the quarterly report for Alice.",
        ttl_seconds=600,
        tools=["demo.read"],
    )
    proxy = task.proxy_credential()
    os.environ["HTTP_PROXY"] = os.environ["HTTPS_PROXY"] = proxy.proxy_url(os.environ["PROXY_ADDR"])
    os.environ["REQUESTS_CA_BUNDLE"] = os.environ["PROXY_CA"]
    statuses = []
    bodies = []
    with open(os.environ["OUT"], "wb") as out:
        for url in urls:
            r = requests.get(url, timeout=30)
            statuses.append(r.status_code)
            out.write(f"HTTP {r.status_code} {r.reason}\r\n".encode())
            for k, v in r.raw.headers.items():
                out.write(f"{k}: {v}\r\n".encode())
            out.write(b"\r\n" + r.content + b"\r\n")
            bodies.append(r.text)
    print(json.dumps({"task": task.id, "statuses": statuses, "canary_len": len(canary)}), flush=True)
    # the parent reads this process's memory while everything is still here
    sys.stdin.readline()
    done = task.complete()
    print(json.dumps({"revoked": [lease.lease_id for lease in done.revoked], "kept": len(bodies)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
