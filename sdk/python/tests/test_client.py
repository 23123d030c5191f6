"""The SDK against a real `leasehold dev`: every outcome of a call, the task
scope, and what never leaks."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

import leasehold
from leasehold import Client

from conftest import Broker

DEMO = {"provider": "token", "role": "demo", "ttl_seconds": 60}
TOOLS = ["demo.read", "demo.write", "demo.admin"]


def client(broker: Broker, who: str = "assistant-a") -> Client:
    return Client(broker.url, token=broker.tokens[who])


def test_allowed_call_gets_a_working_credential_that_never_shows(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with client(broker) as c, c.task(purpose="summarise", on_behalf_of="alice@example.com",
                                     prompt="Summarise doc 1", tools=TOOLS, ttl_seconds=600) as task:
        r = task.call("demo.read", "read", "doc:1", arguments={"doc": 1, "lines": [1, 2]}, credential=DEMO)
        assert r.decision == "allow"
        assert r.lease is not None
        token = r.lease.credential.token
        assert broker.introspect(token)["active"] is True
        # the secret is reachable only through the accessor
        for text in (repr(r), str(r), repr(r.lease), repr(r.lease.credential), r.model_dump_json(),
                     str(r.model_dump())):
            assert token not in text
        assert r.lease.credential.fields == ["audience", "token", "token_type"]
        # only the hash of the arguments reached the broker
        detail = task.refresh()
        assert detail.calls[0].call_id == r.call_id
        lease_id = r.lease.lease_id
    # the scope completed the task: the lease is revoked, the token dead
    assert broker.introspect(token)["active"] is False
    assert broker.as_operator("admin", "GET", f"/v1/leases/{lease_id}")["state"] == "revoked"
    assert token not in caplog.text
    events = broker.as_operator("admin", "GET", f"/v1/events?task={task.id}")["events"]
    decided = [e for e in events if e["kind"] == "call.decided"][0]
    assert decided["data"]["arguments_sha256"] == leasehold.arguments_sha256({"lines": [1, 2], "doc": 1})


def test_direct_lease_and_revocation(broker: Broker) -> None:
    with client(broker) as c, c.task(purpose="lease", on_behalf_of="alice@example.com", prompt="p",
                                     ttl_seconds=300) as task:
        lease = task.lease("token", "demo", 60, scope=["demo:read"])
        assert lease.scope == ["demo:read"]
        assert broker.introspect(lease.credential.token)["scope"] == "demo:read"
        revoked = c.revoke_lease(lease.lease_id)
        assert revoked.state == "revoked"
        assert broker.introspect(lease.credential.token)["active"] is False


def test_denied_call_raises_with_the_policys_reasons(broker: Broker) -> None:
    with client(broker) as c, c.task(purpose="deny", on_behalf_of="alice@example.com", prompt="p",
                                     tools=TOOLS, ttl_seconds=300) as task:
        with pytest.raises(leasehold.PolicyDenied) as e:
            task.call("demo.admin", "restart", "db:prod")
        assert e.value.status == 403 and e.value.code == "policy_denied"
        assert e.value.decision is not None and e.value.decision.outcome == "deny"
        assert any("break-glass" in r for r in e.value.reasons), e.value.reasons
        # a tool the policy set does not know
        with pytest.raises(leasehold.BadRequest) as u:
            task.call("demo.unknown", "x")
        assert u.value.code == "unknown_tool"
    with client(broker) as c, c.task(purpose="deny", on_behalf_of="alice@example.com", prompt="p",
                                     tools=["demo.read"], ttl_seconds=300) as task:
        # a tool the task did not declare
        with pytest.raises(leasehold.PolicyDenied) as e:
            task.call("demo.write", "update", "ticket:1")
        assert any("did not declare" in r for r in e.value.reasons), e.value.reasons


def test_approval_round_trip(broker: Broker) -> None:
    with client(broker) as c, c.task(purpose="approve", on_behalf_of="alice@example.com", prompt="p",
                                     tools=TOOLS, ttl_seconds=300) as task:
        with pytest.raises(leasehold.ApprovalRequired) as e:
            task.call("demo.write", "update", "ticket:42", arguments={"text": "hi"})
        approval_id = e.value.approval_id
        assert approval_id.startswith("appr_") and e.value.policies
        # the approver decides while the workload long-polls
        def approve() -> None:
            time.sleep(0.5)
            broker.as_operator("approver", "POST", f"/v1/approvals/{approval_id}/approve", {"comment": "ok"})
        t = threading.Thread(target=approve)
        t.start()
        started = time.monotonic()
        a = task.wait_for_approval(approval_id, timeout=20)
        t.join()
        assert a.state == "approved" and 0.3 < time.monotonic() - started < 10
        r = task.call("demo.write", "update", "ticket:42", arguments={"text": "hi"}, approval_id=approval_id)
        assert r.decision == "allow" and r.approval_id == approval_id
        # the approval was for that exact request: other arguments need their own
        with pytest.raises(leasehold.LeaseholdError):
            task.call("demo.write", "update", "ticket:42", arguments={"text": "other"}, approval_id=approval_id)
        # a denial is an exception with the approver's comment
        with pytest.raises(leasehold.ApprovalRequired) as e2:
            task.call("demo.write", "update", "ticket:43")
        broker.as_operator("approver", "POST", f"/v1/approvals/{e2.value.approval_id}/deny", {"comment": "not 43"})
        with pytest.raises(leasehold.ApprovalDenied) as d:
            task.wait_for_approval(e2.value.approval_id, timeout=5)
        assert d.value.comment == "not 43"
        # nobody decides: a timeout, after about the time given
        with pytest.raises(leasehold.ApprovalRequired) as e3:
            task.call("demo.write", "update", "ticket:44")
        started = time.monotonic()
        with pytest.raises(leasehold.ApprovalTimeout):
            task.wait_for_approval(e3.value.approval_id, timeout=1.5)
        assert time.monotonic() - started < 10


def test_call_can_wait_for_its_approval_itself(broker: Broker) -> None:
    with client(broker) as c, c.task(purpose="wait", on_behalf_of="alice@example.com", prompt="p",
                                     tools=TOOLS, ttl_seconds=300) as task:
        def approver() -> None:
            for _ in range(100):
                pending = broker.as_operator("approver", "GET", "/v1/approvals")["approvals"]
                mine = [a for a in pending if a["task_id"] == task.id]
                if mine:
                    broker.as_operator("approver", "POST", f"/v1/approvals/{mine[0]['approval_id']}/approve", {})
                    return
                time.sleep(0.1)
        t = threading.Thread(target=approver)
        t.start()
        r = task.call("demo.write", "update", "ticket:7", wait_for_approval=20)
        t.join()
        assert r.decision == "allow" and r.approval_id is not None


def test_break_glass_is_allowed_and_flagged(broker: Broker) -> None:
    with client(broker) as c, c.task(purpose="incident", on_behalf_of="alice@example.com", prompt="p",
                                     tools=TOOLS, ttl_seconds=300) as task:
        r = task.call("demo.admin", "restart", "db:prod", break_glass="prod is down, INC-7")
        assert r.decision == "allow" and r.break_glass is True
    reviews = broker.as_operator("approver", "GET", "/v1/reviews")["reviews"]
    assert any(rv["task_id"] == task.id for rv in reviews)


def test_a_fenced_workload_is_refused(broker: Broker) -> None:
    with client(broker, "assistant-b") as c:
        broker.as_operator("responder", "POST", "/v1/revocations",
                           {"workload": "dev:assistant-b", "fence": True, "reason": "INC-1: sdk test"})
        try:
            with pytest.raises(leasehold.Fenced) as e:
                c.open_task(purpose="p", on_behalf_of="alice@example.com", prompt="p", ttl_seconds=60)
            assert e.value.status == 403
        finally:
            broker.as_operator("responder", "POST", "/v1/fences/lift",
                               {"kind": "workload", "value": "dev:assistant-b", "reason": "done"})
        c.open_task(purpose="p", on_behalf_of="alice@example.com", prompt="p", ttl_seconds=60).complete()


class Boom(Exception):
    pass


def test_an_exception_in_the_scope_still_completes_the_task(broker: Broker) -> None:
    tokens = []
    with client(broker) as c:
        with pytest.raises(Boom):
            with c.task(purpose="crash", on_behalf_of="alice@example.com", prompt="p", tools=TOOLS,
                        ttl_seconds=300) as task:
                for i in range(3):
                    r = task.call("demo.read", "read", f"doc:{i}", credential=DEMO)
                    assert r.lease is not None
                    tokens.append(r.lease.credential.token)
                raise Boom()
        assert c.get_task(task.id).state == "completed"
    assert all(broker.introspect(t)["active"] is False for t in tokens)


def test_the_token_file_is_read_again_when_it_changes(broker: Broker, tmp_path: Path) -> None:
    f = broker.token_file("assistant-a", tmp_path)
    with Client(broker.url, token_file=f) as c:
        t = c.open_task(purpose="p", on_behalf_of="alice@example.com", prompt="p", ttl_seconds=60)
        assert t.info.workload == "dev:assistant-a"
        t.complete()
        # rotated in place, as a kubelet does
        tmp = tmp_path / "new"
        tmp.write_text(broker.tokens["assistant-b"] + "\n")
        tmp.replace(f)
        t = c.open_task(purpose="p", on_behalf_of="alice@example.com", prompt="p", ttl_seconds=60)
        assert t.info.workload == "dev:assistant-b"
        t.complete()
        f.write_text("not-a-token")
        with pytest.raises(leasehold.Unauthenticated):
            c.open_task(purpose="p", on_behalf_of="alice@example.com", prompt="p", ttl_seconds=60)


def test_bad_settings_fail_at_once(tmp_path: Path) -> None:
    with pytest.raises(leasehold.Unauthenticated, match="cannot read the token file"):
        Client("http://127.0.0.1:1", token_file=tmp_path / "missing")
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1")
    with pytest.raises(ValueError):
        Client("127.0.0.1:7711", token="t")


def test_bad_input_is_a_clear_error(broker: Broker) -> None:
    with client(broker) as c:
        with pytest.raises(leasehold.NotFound):
            c.get_task("task_00000000000000000000000000")
        with pytest.raises(leasehold.BadRequest):
            c.get_task("nope")
        with c.task(purpose="p", on_behalf_of="alice@example.com", prompt="p", tools=TOOLS, ttl_seconds=60) as task:
            with pytest.raises(leasehold.BadRequest) as e:
                task.lease("nope", "demo", 60)
            assert e.value.code == "unknown_provider"
    with Client(broker.url, token="garbage") as bad:
        with pytest.raises(leasehold.Unauthenticated):
            bad.open_task(purpose="p", on_behalf_of="u", prompt="p", ttl_seconds=60)
    # an unreachable broker, after the retries
    with Client("http://127.0.0.1:1", token="t", max_retries=1, backoff_seconds=0.01) as down:
        with pytest.raises(leasehold.Unreachable):
            down.get_task("task_00000000000000000000000000")


def test_whoami_and_providers(broker: Broker) -> None:
    with client(broker) as c:
        me = c.whoami()
        assert (me.kind, me.id, me.issuer, me.subject) == ("workload", "dev:assistant-a", "dev", "assistant-a")
        roles = {(p.name, r.name): r for p in c.providers() for r in p.roles}
        assert roles[("token", "demo")].max_ttl_seconds == 900
        assert roles[("token", "demo-bound")].binding == "required"
    with Client(broker.url, token=broker.tokens["approver"]) as op:
        me = op.whoami()
        assert (me.kind, me.id, me.roles) == ("operator", "approver", ["approver"])
