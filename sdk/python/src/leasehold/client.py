"""The clients: `Client` (blocking) and `AsyncClient` (asyncio), the same
operations with the same arguments, and the tasks they open."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from types import TracebackType
from typing import Any, Optional, Union

import httpx

from . import errors, models
from ._core import LONG_POLL_SECONDS, Core, Request, tls_verify

log = logging.getLogger("leasehold")

PathLike = Union[str, "os.PathLike[str]"]
CredentialArg = Union[models.CredentialRequest, dict[str, Any], None]


class Client:
    """A workload's client of the broker (blocking).

    >>> client = Client("https://leasehold.internal:8443", token_file="/var/run/secrets/tokens/leasehold")
    >>> with client.task(purpose="triage", on_behalf_of="alice@example.com",
    ...                  prompt=prompt, tools=["tickets.read"], ttl_seconds=600) as task:
    ...     result = task.call("tickets.read", "read", "ticket:42",
    ...                        credential={"provider": "api", "role": "reader", "ttl_seconds": 60})
    ...     use(result.lease.credential.token)
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: Optional[str] = None,
        token_file: Optional[PathLike] = None,
        ca_file: Optional[PathLike] = None,
        verify: bool = True,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 10.0,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self._core = Core(base_url, token, token_file, max_retries, backoff_seconds, max_backoff_seconds)
        self._http = httpx.Client(timeout=timeout, verify=tls_verify(verify, ca_file), transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, req: Request) -> tuple[int, Any]:
        attempt = 0
        while True:
            try:
                resp = self._http.request(
                    req.method,
                    self._core.url(req.path),
                    json=req.body,
                    params=req.params or None,
                    headers=self._core.headers(),
                    timeout=req.timeout if req.timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                return self._core.answer(resp)
            except httpx.TransportError as e:
                err: errors.LeaseholdError = self._core.transport_error(e)
            except errors.LeaseholdError as e:
                err = e
            if attempt >= self._core.max_retries or not self._core.may_retry(req, err):
                raise err
            wait = self._core.delay(attempt, err)
            log.info("leasehold: %s %s answered %s; retrying in %.1fs", req.method, req.path, err.code, wait)
            time.sleep(wait)
            attempt += 1

    # --- who and what ---

    def whoami(self) -> models.Identity:
        """Who the token signs in as; `Unauthenticated` if it does not."""
        _, body = self._send(Request("GET", "/v1/whoami", idempotent=True))
        return models.Identity.model_validate(body)

    def providers(self) -> list[models.Provider]:
        """The providers and roles credentials may be asked of."""
        _, body = self._send(Request("GET", "/v1/providers", idempotent=True))
        return models.ProviderList.model_validate(body).providers

    # --- tasks ---

    def open_task(
        self,
        *,
        purpose: str,
        on_behalf_of: str,
        ttl_seconds: int,
        prompt: Optional[str] = None,
        prompt_sha256: Optional[str] = None,
        tools: Optional[list[str]] = None,
    ) -> Task:
        """Open a task; complete it with `Task.complete()` (or use `task()`)."""
        _, body = self._send(Core.open_task(purpose, on_behalf_of, ttl_seconds, prompt, prompt_sha256, tools))
        return Task(self, models.Task.model_validate(body))

    def task(
        self,
        *,
        purpose: str,
        on_behalf_of: str,
        ttl_seconds: int,
        prompt: Optional[str] = None,
        prompt_sha256: Optional[str] = None,
        tools: Optional[list[str]] = None,
    ) -> TaskScope:
        """`with client.task(...) as task:` opens a task and completes it
        (revoking every lease) on the way out, also on an exception."""
        return TaskScope(self, dict(purpose=purpose, on_behalf_of=on_behalf_of, ttl_seconds=ttl_seconds,
                                    prompt=prompt, prompt_sha256=prompt_sha256, tools=tools))

    def get_task(self, task_id: str) -> models.TaskDetail:
        _, body = self._send(Request("GET", f"/v1/tasks/{task_id}", idempotent=True))
        return models.TaskDetail.model_validate(body)

    def complete_task(self, task_id: str) -> models.Completion:
        _, body = self._send(Request("POST", f"/v1/tasks/{task_id}/complete", idempotent=True))
        return models.Completion.model_validate(body)

    def proxy_credential(self, task_id: str, *, ttl_seconds: Optional[int] = None) -> models.ProxyCredential:
        """A credential for `leasehold proxy`, bound to the task (recorded on it)."""
        req = models.ProxyCredentialRequest(ttl_seconds=ttl_seconds).model_dump(exclude_none=True)
        _, body = self._send(Request("POST", f"/v1/tasks/{task_id}/proxy-credentials", body=req))
        return models.ProxyCredential.model_validate(body)

    # --- calls and leases ---

    def call(
        self,
        task_id: str,
        tool: str,
        action: str,
        resource: str = "",
        *,
        arguments: Any = None,
        credential: CredentialArg = None,
        approval_id: Optional[str] = None,
        break_glass: Optional[str] = None,
    ) -> models.CallResult:
        status, body = self._send(
            Core.call(task_id, tool, action, resource, arguments, credential, approval_id, break_glass)
        )
        Core.pending(status, body)
        return models.CallResult.model_validate(body)

    def lease(
        self,
        task_id: str,
        provider: str,
        role: str,
        ttl_seconds: int,
        *,
        scope: Optional[list[str]] = None,
        approval_id: Optional[str] = None,
    ) -> models.IssuedLease:
        status, body = self._send(Core.lease(task_id, provider, role, ttl_seconds, scope, approval_id))
        Core.pending(status, body)
        return models.IssuedLease.model_validate(body)

    def get_lease(self, lease_id: str) -> models.Lease:
        _, body = self._send(Request("GET", f"/v1/leases/{lease_id}", idempotent=True))
        return models.Lease.model_validate(body)

    def revoke_lease(self, lease_id: str) -> models.Lease:
        _, body = self._send(Request("POST", f"/v1/leases/{lease_id}/revoke", idempotent=True))
        return models.Lease.model_validate(body)

    # --- approvals ---

    def get_approval(self, approval_id: str) -> models.Approval:
        _, body = self._send(Request("GET", f"/v1/approvals/{approval_id}", idempotent=True))
        return models.Approval.model_validate(body)

    def wait_for_approval(self, approval_id: str, timeout: float = 300.0) -> models.Approval:
        """Long-poll until an approver decides: the approval when approved;
        `ApprovalDenied`, `ApprovalExpired` or `ApprovalTimeout` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            wait = int(max(0, min(left, LONG_POLL_SECONDS)))
            _, body = self._send(Core.approval_poll(approval_id, wait))
            done = Core.decided(models.Approval.model_validate(body))
            if done is not None:
                return done
            if time.monotonic() >= deadline:
                raise errors.ApprovalTimeout(approval_id)


class Task:
    """An open task of a `Client`."""

    def __init__(self, client: Client, info: models.Task) -> None:
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.task_id

    def __repr__(self) -> str:
        return f"Task({self.id!r}, purpose={self.info.purpose!r}, state={self.info.state!r})"

    def call(
        self,
        tool: str,
        action: str,
        resource: str = "",
        *,
        arguments: Any = None,
        credential: CredentialArg = None,
        approval_id: Optional[str] = None,
        break_glass: Optional[str] = None,
        wait_for_approval: Optional[float] = None,
    ) -> models.CallResult:
        """Ask policy about one tool call. `arguments` are hashed here and
        only the hash is sent. Allowed: the result (with `lease` if a
        `credential` was asked for). Denied: `PolicyDenied`. Needing
        approval: `ApprovalRequired`, or, with `wait_for_approval=seconds`,
        a wait for the approver and the same call again."""
        try:
            return self.client.call(self.id, tool, action, resource, arguments=arguments, credential=credential,
                                    approval_id=approval_id, break_glass=break_glass)
        except errors.ApprovalRequired as e:
            if wait_for_approval is None or approval_id is not None:
                raise
            self.client.wait_for_approval(e.approval_id, timeout=wait_for_approval)
            return self.client.call(self.id, tool, action, resource, arguments=arguments, credential=credential,
                                    approval_id=e.approval_id, break_glass=break_glass)

    def lease(
        self,
        provider: str,
        role: str,
        ttl_seconds: int,
        *,
        scope: Optional[list[str]] = None,
        approval_id: Optional[str] = None,
    ) -> models.IssuedLease:
        """Lease a credential for this task (decided by policy too)."""
        return self.client.lease(self.id, provider, role, ttl_seconds, scope=scope, approval_id=approval_id)

    def wait_for_approval(self, approval_id: str, timeout: float = 300.0) -> models.Approval:
        return self.client.wait_for_approval(approval_id, timeout=timeout)

    def refresh(self) -> models.TaskDetail:
        """The task now, with its calls and leases."""
        detail = self.client.get_task(self.id)
        self.info = detail
        return detail

    def proxy_credential(self, *, ttl_seconds: Optional[int] = None) -> models.ProxyCredential:
        """A credential for `leasehold proxy` that dies with this task."""
        return self.client.proxy_credential(self.id, ttl_seconds=ttl_seconds)

    def complete(self) -> models.Completion:
        """Complete the task: every lease it holds is revoked."""
        return self.client.complete_task(self.id)


class TaskScope:
    """`with client.task(...) as task:`"""

    def __init__(self, client: Client, args: dict[str, Any]) -> None:
        self._client = client
        self._args = args
        self._task: Optional[Task] = None

    def __enter__(self) -> Task:
        self._task = self._client.open_task(**self._args)
        return self._task

    def __exit__(
        self, kind: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if self._task is None:
            return
        try:
            self._task.complete()
        except errors.LeaseholdError as e:
            if exc is None:
                raise
            # the body's own error matters more; the leases still die with
            # the task's deadline
            log.error("leasehold: completing task %s failed: %s", self._task.id, e)


class AsyncClient:
    """`Client` for asyncio: the same operations, awaited."""

    def __init__(
        self,
        base_url: str,
        *,
        token: Optional[str] = None,
        token_file: Optional[PathLike] = None,
        ca_file: Optional[PathLike] = None,
        verify: bool = True,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 10.0,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self._core = Core(base_url, token, token_file, max_retries, backoff_seconds, max_backoff_seconds)
        self._http = httpx.AsyncClient(timeout=timeout, verify=tls_verify(verify, ca_file), transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, req: Request) -> tuple[int, Any]:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(
                    req.method,
                    self._core.url(req.path),
                    json=req.body,
                    params=req.params or None,
                    headers=self._core.headers(),
                    timeout=req.timeout if req.timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                return self._core.answer(resp)
            except httpx.TransportError as e:
                err: errors.LeaseholdError = self._core.transport_error(e)
            except errors.LeaseholdError as e:
                err = e
            if attempt >= self._core.max_retries or not self._core.may_retry(req, err):
                raise err
            wait = self._core.delay(attempt, err)
            log.info("leasehold: %s %s answered %s; retrying in %.1fs", req.method, req.path, err.code, wait)
            await asyncio.sleep(wait)
            attempt += 1

    async def whoami(self) -> models.Identity:
        _, body = await self._send(Request("GET", "/v1/whoami", idempotent=True))
        return models.Identity.model_validate(body)

    async def providers(self) -> list[models.Provider]:
        _, body = await self._send(Request("GET", "/v1/providers", idempotent=True))
        return models.ProviderList.model_validate(body).providers

    async def open_task(
        self,
        *,
        purpose: str,
        on_behalf_of: str,
        ttl_seconds: int,
        prompt: Optional[str] = None,
        prompt_sha256: Optional[str] = None,
        tools: Optional[list[str]] = None,
    ) -> AsyncTask:
        _, body = await self._send(Core.open_task(purpose, on_behalf_of, ttl_seconds, prompt, prompt_sha256, tools))
        return AsyncTask(self, models.Task.model_validate(body))

    def task(
        self,
        *,
        purpose: str,
        on_behalf_of: str,
        ttl_seconds: int,
        prompt: Optional[str] = None,
        prompt_sha256: Optional[str] = None,
        tools: Optional[list[str]] = None,
    ) -> AsyncTaskScope:
        """`async with client.task(...) as task:`, completed on the way out."""
        return AsyncTaskScope(self, dict(purpose=purpose, on_behalf_of=on_behalf_of, ttl_seconds=ttl_seconds,
                                         prompt=prompt, prompt_sha256=prompt_sha256, tools=tools))

    async def get_task(self, task_id: str) -> models.TaskDetail:
        _, body = await self._send(Request("GET", f"/v1/tasks/{task_id}", idempotent=True))
        return models.TaskDetail.model_validate(body)

    async def complete_task(self, task_id: str) -> models.Completion:
        _, body = await self._send(Request("POST", f"/v1/tasks/{task_id}/complete", idempotent=True))
        return models.Completion.model_validate(body)

    async def proxy_credential(self, task_id: str, *, ttl_seconds: Optional[int] = None) -> models.ProxyCredential:
        req = models.ProxyCredentialRequest(ttl_seconds=ttl_seconds).model_dump(exclude_none=True)
        _, body = await self._send(Request("POST", f"/v1/tasks/{task_id}/proxy-credentials", body=req))
        return models.ProxyCredential.model_validate(body)

    async def call(
        self,
        task_id: str,
        tool: str,
        action: str,
        resource: str = "",
        *,
        arguments: Any = None,
        credential: CredentialArg = None,
        approval_id: Optional[str] = None,
        break_glass: Optional[str] = None,
    ) -> models.CallResult:
        status, body = await self._send(
            Core.call(task_id, tool, action, resource, arguments, credential, approval_id, break_glass)
        )
        Core.pending(status, body)
        return models.CallResult.model_validate(body)

    async def lease(
        self,
        task_id: str,
        provider: str,
        role: str,
        ttl_seconds: int,
        *,
        scope: Optional[list[str]] = None,
        approval_id: Optional[str] = None,
    ) -> models.IssuedLease:
        status, body = await self._send(Core.lease(task_id, provider, role, ttl_seconds, scope, approval_id))
        Core.pending(status, body)
        return models.IssuedLease.model_validate(body)

    async def get_lease(self, lease_id: str) -> models.Lease:
        _, body = await self._send(Request("GET", f"/v1/leases/{lease_id}", idempotent=True))
        return models.Lease.model_validate(body)

    async def revoke_lease(self, lease_id: str) -> models.Lease:
        _, body = await self._send(Request("POST", f"/v1/leases/{lease_id}/revoke", idempotent=True))
        return models.Lease.model_validate(body)

    async def get_approval(self, approval_id: str) -> models.Approval:
        _, body = await self._send(Request("GET", f"/v1/approvals/{approval_id}", idempotent=True))
        return models.Approval.model_validate(body)

    async def wait_for_approval(self, approval_id: str, timeout: float = 300.0) -> models.Approval:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            wait = int(max(0, min(left, LONG_POLL_SECONDS)))
            _, body = await self._send(Core.approval_poll(approval_id, wait))
            done = Core.decided(models.Approval.model_validate(body))
            if done is not None:
                return done
            if time.monotonic() >= deadline:
                raise errors.ApprovalTimeout(approval_id)


class AsyncTask:
    """An open task of an `AsyncClient`."""

    def __init__(self, client: AsyncClient, info: models.Task) -> None:
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.task_id

    def __repr__(self) -> str:
        return f"AsyncTask({self.id!r}, purpose={self.info.purpose!r}, state={self.info.state!r})"

    async def call(
        self,
        tool: str,
        action: str,
        resource: str = "",
        *,
        arguments: Any = None,
        credential: CredentialArg = None,
        approval_id: Optional[str] = None,
        break_glass: Optional[str] = None,
        wait_for_approval: Optional[float] = None,
    ) -> models.CallResult:
        """`Task.call`, awaited."""
        try:
            return await self.client.call(self.id, tool, action, resource, arguments=arguments,
                                          credential=credential, approval_id=approval_id, break_glass=break_glass)
        except errors.ApprovalRequired as e:
            if wait_for_approval is None or approval_id is not None:
                raise
            await self.client.wait_for_approval(e.approval_id, timeout=wait_for_approval)
            return await self.client.call(self.id, tool, action, resource, arguments=arguments,
                                          credential=credential, approval_id=e.approval_id, break_glass=break_glass)

    async def lease(
        self,
        provider: str,
        role: str,
        ttl_seconds: int,
        *,
        scope: Optional[list[str]] = None,
        approval_id: Optional[str] = None,
    ) -> models.IssuedLease:
        return await self.client.lease(self.id, provider, role, ttl_seconds, scope=scope, approval_id=approval_id)

    async def wait_for_approval(self, approval_id: str, timeout: float = 300.0) -> models.Approval:
        return await self.client.wait_for_approval(approval_id, timeout=timeout)

    async def refresh(self) -> models.TaskDetail:
        detail = await self.client.get_task(self.id)
        self.info = detail
        return detail

    async def proxy_credential(self, *, ttl_seconds: Optional[int] = None) -> models.ProxyCredential:
        return await self.client.proxy_credential(self.id, ttl_seconds=ttl_seconds)

    async def complete(self) -> models.Completion:
        return await self.client.complete_task(self.id)


class AsyncTaskScope:
    """`async with client.task(...) as task:`"""

    def __init__(self, client: AsyncClient, args: dict[str, Any]) -> None:
        self._client = client
        self._args = args
        self._task: Optional[AsyncTask] = None

    async def __aenter__(self) -> AsyncTask:
        self._task = await self._client.open_task(**self._args)
        return self._task

    async def __aexit__(
        self, kind: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if self._task is None:
            return
        try:
            # completes even when the body was cancelled
            await asyncio.shield(self._task.complete())
        except errors.LeaseholdError as e:
            if exc is None:
                raise
            log.error("leasehold: completing task %s failed: %s", self._task.id, e)
