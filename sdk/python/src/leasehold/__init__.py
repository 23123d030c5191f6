"""leasehold: the Python client of the leasehold secrets broker.

An assistant signs in as a workload, opens a task (purpose, the user it
acts for, the prompt, a deadline), and asks the broker about every tool
call; allowed calls get short-lived credentials leased to the task, which
completing the task revokes.

    from leasehold import Client

    client = Client("http://127.0.0.1:7711", token_file="token")
    with client.task(purpose="summarise Q3", on_behalf_of="alice@example.com",
                     prompt=prompt, tools=["demo.read"], ttl_seconds=600) as task:
        r = task.call("demo.read", "read", "doc:1", arguments={"doc": 1},
                      credential={"provider": "token", "role": "demo", "ttl_seconds": 60})
        fetch_doc(1, token=r.lease.credential.token)
"""

from ._core import __version__, arguments_sha256
from .client import AsyncClient, AsyncTask, Client, Task
from .errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalRequired,
    ApprovalTimeout,
    BadRequest,
    BindingRequired,
    Conflict,
    Fenced,
    Forbidden,
    LeaseholdError,
    NotFound,
    PolicyDenied,
    ProviderFailed,
    QuotaExceeded,
    RateLimited,
    Unauthenticated,
    Unavailable,
    Unreachable,
)
from .models import Credential, CredentialRequest

__all__ = [
    "__version__",
    "arguments_sha256",
    "AsyncClient",
    "AsyncTask",
    "Client",
    "Task",
    "Credential",
    "CredentialRequest",
    "LeaseholdError",
    "ApprovalDenied",
    "ApprovalExpired",
    "ApprovalRequired",
    "ApprovalTimeout",
    "BadRequest",
    "BindingRequired",
    "Conflict",
    "Fenced",
    "Forbidden",
    "NotFound",
    "PolicyDenied",
    "ProviderFailed",
    "QuotaExceeded",
    "RateLimited",
    "Unauthenticated",
    "Unavailable",
    "Unreachable",
]
