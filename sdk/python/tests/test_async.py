"""`AsyncClient`: the same behaviour, awaited."""

from __future__ import annotations

import asyncio

import pytest

import leasehold
from leasehold import AsyncClient

from conftest import Broker

DEMO = {"provider": "token", "role": "demo", "ttl_seconds": 60}
TOOLS = ["demo.read", "demo.write", "demo.admin"]


class Boom(Exception):
    pass


def test_async_allow_deny_approval_and_completion_on_exception(broker: Broker) -> None:
    async def main() -> list[str]:
        tokens: list[str] = []
        async with AsyncClient(broker.url, token=broker.tokens["assistant-a"]) as c:
            with pytest.raises(Boom):
                async with c.task(purpose="async", on_behalf_of="alice@example.com", prompt="p",
                                  tools=TOOLS, ttl_seconds=300) as task:
                    # concurrent calls on one task
                    results = await asyncio.gather(*[
                        task.call("demo.read", "read", f"doc:{i}", arguments={"i": i}, credential=DEMO)
                        for i in range(5)
                    ])
                    for r in results:
                        assert r.lease is not None
                        tokens.append(r.lease.credential.token)
                    assert all(broker.introspect(t)["active"] for t in tokens)
                    with pytest.raises(leasehold.PolicyDenied):
                        await task.call("demo.admin", "restart", "db:prod")
                    with pytest.raises(leasehold.ApprovalRequired) as e:
                        await task.call("demo.write", "update", "ticket:9")

                    async def approve() -> None:
                        await asyncio.sleep(0.3)
                        await asyncio.to_thread(broker.as_operator, "approver", "POST",
                                                f"/v1/approvals/{e.value.approval_id}/approve", {})
                    waited, _ = await asyncio.gather(task.wait_for_approval(e.value.approval_id, timeout=20),
                                                     approve())
                    assert waited.state == "approved"
                    r = await task.call("demo.write", "update", "ticket:9", approval_id=e.value.approval_id)
                    assert r.decision == "allow"
                    raise Boom()
            assert (await c.get_task(task.id)).state == "completed"
        return tokens

    tokens = asyncio.run(main())
    assert len(tokens) == 5
    assert not any(broker.introspect(t)["active"] for t in tokens)


def test_async_cancellation_still_completes_the_task(broker: Broker) -> None:
    async def main() -> str:
        async with AsyncClient(broker.url, token=broker.tokens["assistant-a"]) as c:
            holder: dict[str, str] = {}

            async def body() -> None:
                async with c.task(purpose="cancel", on_behalf_of="alice@example.com", prompt="p",
                                  tools=TOOLS, ttl_seconds=300) as task:
                    holder["task"] = task.id
                    r = await task.call("demo.read", "read", "doc:1", credential=DEMO)
                    assert r.lease is not None
                    holder["token"] = r.lease.credential.token
                    await asyncio.sleep(60)

            t = asyncio.create_task(body())
            while "token" not in holder:
                await asyncio.sleep(0.05)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            assert (await c.get_task(holder["task"])).state == "completed"
            return holder["token"]

    token = asyncio.run(main())
    assert broker.introspect(token)["active"] is False
