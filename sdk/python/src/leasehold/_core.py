"""What the sync and async clients share: the workload token, requests as
data, answers as models or exceptions, and the retry schedule. Only the
sending differs between the two."""

from __future__ import annotations

import hashlib
import json
import os
import random
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import httpx

from . import errors, models

__version__ = "0.1.0"

#: The longest a single long poll waits at the broker (its own cap).
LONG_POLL_SECONDS = 30


def arguments_sha256(arguments: Any) -> str:
    """SHA-256 (hex) of a call's arguments as canonical JSON: keys sorted,
    no whitespace, UTF-8. Only this hash leaves the process."""
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TokenSource:
    """The workload token: fixed, or read from a file and read again
    whenever the file changes (Kubernetes projected service-account
    tokens and SPIFFE helpers rotate theirs in place)."""

    def __init__(self, token: Optional[str], token_file: Union[str, os.PathLike[str], None]) -> None:
        if (token is None) == (token_file is None):
            raise ValueError("give exactly one of token= and token_file=")
        self._fixed = token.strip() if token is not None else None
        self._path = Path(token_file) if token_file is not None else None
        self._stamp: Optional[tuple[int, int, int]] = None
        self._cached = ""
        self._lock = threading.Lock()
        if self._fixed is not None and not self._fixed:
            raise ValueError("the token is empty")
        self.current()  # a missing or empty file is an error now, not at the first call

    def current(self) -> str:
        if self._fixed is not None:
            return self._fixed
        assert self._path is not None
        with self._lock:
            try:
                st = self._path.stat()
            except OSError as e:
                raise errors.Unauthenticated("token_file", f"cannot read the token file {self._path}: {e.strerror}") from None
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                text = self._path.read_text(encoding="utf-8").strip()
                if not text:
                    raise errors.Unauthenticated("token_file", f"the token file {self._path} is empty")
                self._cached, self._stamp = text, stamp
            return self._cached


@dataclass
class Request:
    """One API request, before it is sent."""

    method: str
    path: str
    body: Optional[dict[str, Any]] = None
    params: dict[str, Any] = field(default_factory=dict)
    timeout: Optional[float] = None
    #: POSTs are repeated only when the broker said it did nothing (429, 503)
    #: or the connection was never made; GETs also after a dropped answer.
    idempotent: bool = False


def retry_after_of(resp: httpx.Response) -> Optional[float]:
    """`Retry-After` in seconds (the broker sends seconds, never a date)."""
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def tls_verify(verify: bool, ca_file: Union[str, os.PathLike[str], None]) -> Union[bool, ssl.SSLContext]:
    """httpx's `verify`: on by default; `ca_file` trusts a private CA."""
    if ca_file is not None:
        if not verify:
            raise ValueError("ca_file= with verify=False makes no sense")
        return ssl.create_default_context(cafile=os.fspath(ca_file))
    return verify


class Core:
    """Settings and the request/answer logic both clients use."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str],
        token_file: Union[str, os.PathLike[str], None],
        max_retries: int,
        backoff_seconds: float,
        max_backoff_seconds: float,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be http(s)://..., not {base_url!r}")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.base_url = base_url.rstrip("/")
        self.tokens = TokenSource(token, token_file)
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds

    def headers(self) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self.tokens.current()}",
            "user-agent": f"leasehold-python/{__version__}",
            "accept": "application/json",
        }

    def url(self, path: str) -> str:
        return self.base_url + path

    @staticmethod
    def answer(resp: httpx.Response) -> tuple[int, Any]:
        """The answer's status and JSON body, or the error it carries."""
        try:
            body: Any = resp.json() if resp.content else None
        except ValueError:
            body = None
        if resp.status_code >= 400:
            raise errors.from_response(resp.status_code, body, retry_after_of(resp))
        if body is None and resp.status_code != 204:
            raise errors.LeaseholdError("malformed_answer", f"HTTP {resp.status_code} without a JSON body", resp.status_code)
        return resp.status_code, body

    def delay(self, attempt: int, err: errors.LeaseholdError) -> float:
        """How long to wait before attempt `attempt + 1`: the broker's
        `Retry-After` when it gave one, else exponential backoff with jitter."""
        hint = getattr(err, "retry_after", None)
        if isinstance(hint, (int, float)) and hint >= 0:
            return float(min(hint, self.max_backoff_seconds))
        base = min(self.backoff_seconds * (2**attempt), self.max_backoff_seconds)
        return float(base * (0.5 + random.random() / 2))

    @staticmethod
    def transport_error(e: httpx.TransportError) -> errors.Unreachable:
        """A request that got no answer."""
        never_sent = isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))
        return errors.Unreachable(f"{type(e).__name__}: {e}", never_sent)

    @staticmethod
    def may_retry(req: Request, err: errors.LeaseholdError) -> bool:
        """Whether repeating `req` after `err` is safe and may help."""
        if isinstance(err, errors.Unreachable):
            # a request that reached the broker may have been done there
            return err.never_sent or req.idempotent
        return errors.retryable(err)

    # --- the operations, as requests and parsers ---

    @staticmethod
    def open_task(
        purpose: str,
        on_behalf_of: str,
        ttl_seconds: int,
        prompt: Optional[str],
        prompt_sha256: Optional[str],
        tools: Optional[list[str]],
    ) -> Request:
        body = models.OpenTaskRequest(
            purpose=purpose,
            on_behalf_of=on_behalf_of,
            ttl_seconds=ttl_seconds,
            prompt=prompt,
            prompt_sha256=prompt_sha256,
            tools=list(tools or []),
        )
        return Request("POST", "/v1/tasks", body.model_dump(exclude_none=True))

    @staticmethod
    def call(
        task_id: str,
        tool: str,
        action: str,
        resource: str,
        arguments: Any,
        credential: Union[models.CredentialRequest, dict[str, Any], None],
        approval_id: Optional[str],
        break_glass: Optional[str],
    ) -> Request:
        cred = models.CredentialRequest.model_validate(credential) if isinstance(credential, dict) else credential
        body = models.CallRequest(
            tool=tool,
            action=action,
            resource=resource,
            arguments_sha256=arguments_sha256(arguments) if arguments is not None else "",
            credential=cred,
            approval_id=approval_id,
            break_glass=models.BreakGlass(justification=break_glass) if break_glass is not None else None,
        )
        return Request("POST", f"/v1/tasks/{task_id}/calls", body.model_dump(exclude_none=True))

    @staticmethod
    def lease(
        task_id: str, provider: str, role: str, ttl_seconds: int, scope: Optional[list[str]], approval_id: Optional[str]
    ) -> Request:
        body = models.LeaseRequest(
            provider=provider, role=role, ttl_seconds=ttl_seconds, scope=list(scope or []), approval_id=approval_id
        )
        return Request("POST", f"/v1/tasks/{task_id}/leases", body.model_dump(exclude_none=True))

    @staticmethod
    def pending(status: int, body: Any) -> None:
        """A 202 is an approval to wait for: raised, so no code path can
        mistake it for an allowed call."""
        if status == 202:
            p = models.PendingApproval.model_validate(body)
            raise errors.ApprovalRequired(p.approval_id, p.call_id, p.expires_at, p.policies, p.message)

    @staticmethod
    def approval_poll(approval_id: str, wait: int) -> Request:
        return Request(
            "GET",
            f"/v1/approvals/{approval_id}",
            params={"wait": wait},
            timeout=wait + 15.0,
            idempotent=True,
        )

    @staticmethod
    def decided(approval: models.Approval) -> Optional[models.Approval]:
        """The approval if approved; raises if it can no longer be; `None`
        while it is pending."""
        if approval.state == "approved":
            return approval
        if approval.state == "denied":
            raise errors.ApprovalDenied(approval.approval_id, approval.comment)
        if approval.state in ("expired", "consumed"):
            raise errors.ApprovalExpired(approval.approval_id, approval.state)
        return None
