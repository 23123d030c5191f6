"""The gateway's configuration file (TOML), checked before anything runs:
every error names the field."""

from __future__ import annotations

import string
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """The configuration is wrong; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Strict):
    url: str
    #: The workload token (a JWT from the workload's issuer), re-read when it changes.
    token_file: str
    ca_file: Optional[str] = None


class TaskSettings(_Strict):
    #: Why the session's task exists; else the client's `_meta["leasehold/purpose"]`.
    purpose: Optional[str] = None
    #: The user the assistant acts for; else the client's `_meta["leasehold/on_behalf_of"]`.
    on_behalf_of: Optional[str] = None
    ttl_seconds: int = Field(default=900, ge=1)
    #: How long a call waits for a human approver before it gives up.
    approval_wait_seconds: float = Field(default=120, gt=0, le=3600)


class Credential(_Strict):
    provider: str
    role: str
    ttl_seconds: int = Field(ge=1)
    scope: list[str] = Field(default_factory=list)


class Inject(_Strict):
    """Where the credential goes: an environment variable (a command, a
    stdio upstream), a header (an HTTP call, an HTTP upstream) or a tool
    argument. `value` is a template over the credential's fields."""

    into: Literal["env", "header", "argument"]
    name: str
    value: str = "{token}"


class Http(_Strict):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    #: A template over the tool's arguments (each value URL-quoted).
    url: str
    #: Send the tool's arguments as the JSON body.
    json_body: bool = False
    timeout_seconds: float = Field(default=30, gt=0)


class Upstream(_Strict):
    """An upstream MCP server, reached for each call with the credential."""

    command: Optional[list[str]] = None
    url: Optional[str] = None
    #: The upstream's tool name (default: the gateway tool's name).
    tool: Optional[str] = None
    timeout_seconds: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def one_way(self) -> Upstream:
        if (self.command is None) == (self.url is None):
            raise ValueError("set exactly one of command and url")
        return self


class Tool(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    #: The tool as the broker's policy knows it.
    broker_tool: str = Field(pattern=r"^[A-Za-z0-9._:/-]{1,128}$")
    action: str
    #: What the call touches, a template over the arguments, e.g. `doc:{doc}`.
    resource: str = ""
    credential: Optional[Credential] = None
    inject: Optional[Inject] = None
    #: The implementation: exactly one of these.
    command: Optional[list[str]] = None
    http: Optional[Http] = None
    upstream: Optional[Upstream] = None
    timeout_seconds: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def consistent(self) -> Tool:
        ways = [w for w in ("command", "http", "upstream") if getattr(self, w) is not None]
        if len(ways) != 1:
            raise ValueError("set exactly one of command, http and upstream")
        if (self.inject is None) != (self.credential is None):
            raise ValueError("credential and inject go together")
        if self.inject is not None:
            allowed = {"command": {"env", "argument"}, "http": {"header"},
                       "upstream": {"env" if self.upstream and self.upstream.command else "header", "argument"}}
            if self.inject.into not in allowed[ways[0]]:
                raise ValueError(f"a {ways[0]} tool takes its credential by {' or '.join(sorted(allowed[ways[0]]))}, "
                                 f"not {self.inject.into}")
        if self.input_schema.get("type") != "object":
            raise ValueError("input_schema must be a JSON Schema of type object")
        return self

    @field_validator("command")
    @classmethod
    def not_empty(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and not v:
            raise ValueError("the command is empty")
        return v

    def templates(self) -> list[str]:
        out = [self.resource]
        if self.command:
            out.extend(self.command)
        if self.http:
            out.append(self.http.url)
        return out


class GatewayConfig(_Strict):
    broker: BrokerSettings
    task: TaskSettings = Field(default_factory=TaskSettings)
    tools: list[Tool]

    @model_validator(mode="after")
    def unique(self) -> GatewayConfig:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if not self.tools:
            raise ValueError("configure at least one tool")
        for t in self.tools:
            for tpl in t.templates():
                for _, field, _, _ in string.Formatter().parse(tpl):
                    if field is not None and not field.isidentifier():
                        raise ValueError(f"tool {t.name}: template {tpl!r}: `{{{field}}}` is not an argument name")
        return self


def load(path: str | Path) -> GatewayConfig:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    try:
        cfg = GatewayConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{p}: {where}: {first['msg']}") from None
    base = p.parent
    cfg.broker.token_file = str(base / cfg.broker.token_file)
    if cfg.broker.ca_file:
        cfg.broker.ca_file = str(base / cfg.broker.ca_file)
    return cfg
