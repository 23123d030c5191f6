"""The broker's wire types, as pydantic models.

Each model names the schema of the broker's OpenAPI document it mirrors
(`__schema__`); `tests/test_models.py` checks every one against the
document a running broker serves, field by field, so they cannot drift.
Requests refuse unknown fields, as the broker does; responses ignore
fields a newer broker adds.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    __schema__: ClassVar[str] = ""


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")
    __schema__: ClassVar[str] = ""


# === requests ===


class OpenTaskRequest(_Request):
    __schema__ = "OpenTaskBody"
    purpose: str
    on_behalf_of: str
    ttl_seconds: int
    prompt: Optional[str] = None
    prompt_sha256: Optional[str] = None
    tools: list[str] = Field(default_factory=list)


class CredentialRequest(_Request):
    """The credential a call asks for."""

    __schema__ = "CredentialBody"
    provider: str
    role: str
    ttl_seconds: int
    scope: list[str] = Field(default_factory=list)


class BreakGlass(_Request):
    __schema__ = "BreakGlassBody"
    justification: str


class CallRequest(_Request):
    __schema__ = "CallBody"
    tool: str
    action: str
    resource: str = ""
    arguments_sha256: str = ""
    credential: Optional[CredentialRequest] = None
    approval_id: Optional[str] = None
    break_glass: Optional[BreakGlass] = None


class LeaseRequest(_Request):
    __schema__ = "LeaseBody"
    provider: str
    role: str
    ttl_seconds: int
    scope: list[str] = Field(default_factory=list)
    approval_id: Optional[str] = None


# === responses ===


class Decision(_Response):
    """A denial as its caller sees it."""

    __schema__ = "DenialView"
    outcome: str
    action: str
    policies: list[str]
    reasons: list[str]
    call_id: Optional[str] = None


class Task(_Response):
    __schema__ = "TaskView"
    task_id: str
    workload: str
    state: str
    purpose: str
    on_behalf_of: str
    prompt_sha256: str
    tools: list[str]
    created_at: str
    expires_at: str
    lease_count: int
    tenant: Optional[str] = None
    completed_at: Optional[str] = None


class Revocation(_Response):
    __schema__ = "RevocationView"
    cause: str
    requested_at: str
    attempts: int
    job_id: Optional[str] = None
    last_error: Optional[str] = None
    next_attempt_at: Optional[str] = None
    requested_by: Optional[str] = None


class Lease(_Response):
    """A lease as the broker shows it: never its credential."""

    __schema__ = "LeaseView"
    lease_id: str
    task_id: str
    workload: str
    on_behalf_of: str
    provider: str
    role: str
    scope: list[str]
    state: str
    ttl_seconds: int
    created_at: str
    expires_at: str
    tenant: Optional[str] = None
    issued_at: Optional[str] = None
    ended_at: Optional[str] = None
    description: Optional[str] = None
    revocation: Optional[Revocation] = None


class Credential:
    """A leased secret. Its values are never in `repr`, `str` or logs:
    read one with `reveal(name)` (or `token` for a token provider's)."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str]) -> None:
        self._values = {k: SecretStr(v) for k, v in values.items()}

    @property
    def fields(self) -> list[str]:
        """The names of the credential's fields (`token`, `username`, ...)."""
        return sorted(self._values)

    def reveal(self, name: str) -> str:
        """The value of one field, in clear. Keep it out of logs and prompts."""
        try:
            return self._values[name].get_secret_value()
        except KeyError:
            raise KeyError(f"the credential has no field {name!r}; it has {self.fields}") from None

    @property
    def token(self) -> str:
        """`reveal("token")`: the bearer token of a token provider's lease."""
        return self.reveal("token")

    def __repr__(self) -> str:
        return f"Credential(fields={self.fields})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credential) and {k: v.get_secret_value() for k, v in self._values.items()} == {
            k: v.get_secret_value() for k, v in other._values.items()
        }

    def __hash__(self) -> int:
        return hash(tuple(self.fields))


class IssuedLease(Lease):
    """A lease and its credential: the one answer that carries a secret."""

    __schema__ = "IssuedLeaseView"
    credential_fields: dict[str, SecretStr] = Field(alias="credential", repr=False)

    @property
    def credential(self) -> Credential:
        return Credential({k: v.get_secret_value() for k, v in self.credential_fields.items()})


class Call(_Response):
    """A decided call."""

    __schema__ = "CallView"
    call_id: str
    task_id: str
    workload: str
    decision: str
    tool: str
    action: str
    resource: str
    policies: list[str]
    break_glass: bool
    policy_version: str
    created_at: str
    reasons: list[str] = Field(default_factory=list)
    approval_id: Optional[str] = None
    lease_id: Optional[str] = None
    max_ttl_seconds: Optional[int] = None


class CallResult(Call):
    """An allowed call, with its lease when it asked for a credential."""

    __schema__ = "CallResponse"
    lease: Optional[IssuedLease] = None


class PendingApproval(_Response):
    """`202`: the request waits for a human approver."""

    __schema__ = "ApprovalRequiredView"
    decision: str
    call_id: str
    approval_id: str
    expires_at: str
    policies: list[str]
    message: str


class CredentialSpec(_Response):
    __schema__ = "CredentialSpecView"
    provider: str
    role: str
    ttl_seconds: int
    scope: list[str]


class Approval(_Response):
    __schema__ = "ApprovalView"
    approval_id: str
    task_id: str
    workload: str
    on_behalf_of: str
    tool: str
    action: str
    resource: str
    policies: list[str]
    state: str
    request_sha256: str
    created_at: str
    expires_at: str
    comment: Optional[str] = None
    credential: Optional[CredentialSpec] = None
    decided_at: Optional[str] = None
    decided_by: Optional[str] = None


class TaskDetail(Task):
    __schema__ = "TaskDetail"
    calls: list[Call]
    leases: list[Lease]


class Completion(_Response):
    __schema__ = "CompletionView"
    task_id: str
    state: str
    revoked: list[Lease]
    pending: list[Lease]


class Identity(_Response):
    """Who a credential signs in as (`GET /v1/whoami`)."""

    __schema__ = "IdentityView"
    kind: str
    id: str
    roles: list[str]
    issuer: Optional[str] = None
    subject: Optional[str] = None
    tenant: Optional[str] = None


class Role(_Response):
    __schema__ = "RoleView"
    name: str
    max_ttl_seconds: int
    description: str
    #: `unsupported`, `optional` or `required`: bound to the requester's key.
    binding: str


class Provider(_Response):
    __schema__ = "ProviderView"
    name: str
    kind: str
    revocation: str
    roles: list[Role]


class ProviderList(_Response):
    __schema__ = "ProviderList"
    providers: list[Provider]


class ProxyCredentialRequest(_Request):
    __schema__ = "ProxyCredentialBody"
    ttl_seconds: Optional[int] = Field(default=None, ge=1)


class ProxyCredential(_Response):
    """A credential for `leasehold proxy`, bound to one task and ending with
    it. It reaches no upstream itself: the proxy injects the leases. Kept
    out of `repr` like any secret; `proxy_url()` puts it where HTTP clients
    look for it (`HTTP_PROXY`, `HTTPS_PROXY`)."""

    __schema__ = "ProxyCredentialView"
    proxy_credential: SecretStr
    id: str
    task_id: str
    expires_at: str

    def proxy_url(self, address: str) -> str:
        """`http://task:<credential>@<address>`, for `HTTP(S)_PROXY`."""
        return f"http://task:{self.proxy_credential.get_secret_value()}@{address}"


ALL_MODELS: tuple[type[BaseModel], ...] = (
    ProxyCredentialRequest,
    ProxyCredential,
    Identity,
    Role,
    Provider,
    ProviderList,
    OpenTaskRequest,
    CredentialRequest,
    BreakGlass,
    CallRequest,
    LeaseRequest,
    Decision,
    Task,
    Revocation,
    Lease,
    IssuedLease,
    Call,
    CallResult,
    PendingApproval,
    CredentialSpec,
    Approval,
    TaskDetail,
    Completion,
)
