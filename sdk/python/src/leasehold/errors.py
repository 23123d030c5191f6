"""Errors the broker answers with, as exceptions.

Every error the broker sends is `{"error": {"code", "message"}}`; the code
is stable, and the exception class follows from it (then from the HTTP
status). Catch `LeaseholdError` for all of them.
"""

from __future__ import annotations

from typing import Any, Optional

from .models import Decision


class LeaseholdError(Exception):
    """An error answer from the broker (or no answer at all)."""

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class BadRequest(LeaseholdError):
    """400: the request is malformed or names something that does not exist."""


class Unauthenticated(LeaseholdError):
    """401: the workload token is missing, expired or not trusted."""


class Forbidden(LeaseholdError):
    """403: not this caller's to do."""


class PolicyDenied(Forbidden):
    """403 `policy_denied`: policy refused the call; `decision` says why."""

    def __init__(self, code: str, message: str, status: Optional[int], decision: Optional[Decision]) -> None:
        super().__init__(code, message, status)
        self.decision = decision

    @property
    def reasons(self) -> list[str]:
        return list(self.decision.reasons) if self.decision else [self.message]


class Fenced(Forbidden):
    """403 `fenced`: an incident responder fenced this workload, tenant or user."""


class BindingRequired(Forbidden):
    """403 `binding_required`: the role issues only credentials bound to a key."""


class NotFound(LeaseholdError):
    """404: no such task, lease or approval, or not this caller's."""


class Conflict(LeaseholdError):
    """409: the state forbids it (the task completed or expired, ...)."""


class QuotaExceeded(LeaseholdError):
    """429 for a cap (`task_lease_cap`, `workload_lease_cap`): a decision, never retried."""


class RateLimited(LeaseholdError):
    """429 `rate_limited`: retried by the client; raised once retries are spent."""

    def __init__(self, code: str, message: str, status: Optional[int], retry_after: Optional[float]) -> None:
        super().__init__(code, message, status)
        self.retry_after = retry_after


class Unavailable(LeaseholdError):
    """503 (or no answer): the broker or a provider cannot serve now; retried."""

    def __init__(self, code: str, message: str, status: Optional[int], retry_after: Optional[float] = None) -> None:
        super().__init__(code, message, status)
        self.retry_after = retry_after


class Unreachable(Unavailable):
    """No answer from the broker (connection refused, reset, timed out)."""

    def __init__(self, message: str, never_sent: bool) -> None:
        super().__init__("unreachable", message, None)
        #: The connection was never made, so the broker did nothing.
        self.never_sent = never_sent


class ProviderFailed(LeaseholdError):
    """502: the provider failed for good (nothing was issued)."""


class ApprovalRequired(LeaseholdError):
    """202: a human must approve this exact request first.

    Wait with `task.wait_for_approval(e.approval_id)`, then repeat the same
    call with `approval_id=e.approval_id`.
    """

    def __init__(self, approval_id: str, call_id: str, expires_at: str, policies: list[str], message: str) -> None:
        super().__init__("approval_required", message, 202)
        self.approval_id = approval_id
        self.call_id = call_id
        self.expires_at = expires_at
        self.policies = policies


class ApprovalDenied(LeaseholdError):
    """An approver denied the request; `comment` says why."""

    def __init__(self, approval_id: str, comment: Optional[str]) -> None:
        super().__init__("approval_denied", comment or "denied", None)
        self.approval_id = approval_id
        self.comment = comment


class ApprovalExpired(LeaseholdError):
    """No approver decided in time, or the approval was already used."""

    def __init__(self, approval_id: str, state: str) -> None:
        super().__init__("approval_" + state, f"the approval is {state}", None)
        self.approval_id = approval_id
        self.state = state


class ApprovalTimeout(LeaseholdError):
    """`wait_for_approval` gave up before anyone decided."""

    def __init__(self, approval_id: str) -> None:
        super().__init__("approval_timeout", "no decision within the timeout", None)
        self.approval_id = approval_id


_BY_CODE: dict[str, type[LeaseholdError]] = {
    "fenced": Fenced,
    "binding_required": BindingRequired,
    "task_lease_cap": QuotaExceeded,
    "workload_lease_cap": QuotaExceeded,
}

_BY_STATUS: dict[int, type[LeaseholdError]] = {
    400: BadRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    502: ProviderFailed,
}


def from_response(status: int, body: Any, retry_after: Optional[float]) -> LeaseholdError:
    """The exception for an error answer."""
    err = body.get("error") if isinstance(body, dict) else None
    code = str(err.get("code", "")) if isinstance(err, dict) else ""
    message = str(err.get("message", "")) if isinstance(err, dict) else ""
    if not code:
        code, message = f"http_{status}", (str(body)[:200] if body else "no error body")
    if code == "policy_denied":
        raw = body.get("decision") if isinstance(body, dict) else None
        decision = Decision.model_validate(raw) if isinstance(raw, dict) else None
        return PolicyDenied(code, message, status, decision)
    if status == 429 and code not in _BY_CODE:
        return RateLimited(code, message, status, retry_after)
    if status == 503:
        return Unavailable(code, message, status, retry_after)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, LeaseholdError)
    return cls(code, message, status)


def retryable(e: LeaseholdError) -> bool:
    """Whether repeating the same request may succeed: load, not decisions."""
    return isinstance(e, (RateLimited, Unavailable))
