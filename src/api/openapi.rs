//! The OpenAPI 3.1 document, generated from the handlers' own annotations
//! and wire types (utoipa), served at `GET /v1/openapi.json` and written by
//! `leasehold openapi`.
//!
//! The router is built from the same annotations ([`super::routes`] uses
//! `utoipa_axum::routes!`, which takes each handler's method and path from
//! its `#[utoipa::path]`), so a route cannot exist without its entry here.

use std::collections::BTreeMap;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, Ref, RefOr, ResponseBuilder, response::Response as OaResponse,
};
use utoipa::{IntoResponses, Modify, OpenApi};

use super::wire;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "leasehold",
        description = "A secrets broker for AI-assistant workloads: tasks, per-call policy decisions, \
task-bound credential leases, approvals, break-glass, incident response and a tamper-evident \
event chain. Errors are `{\"error\": {\"code\", \"message\"}}` with stable codes; every response \
carries `x-request-id`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&SecuritySchemes),
    components(schemas(wire::ErrorBody)),
    tags(
        (name = "tasks", description = "Workloads open tasks and complete them; completing revokes every lease of the task."),
        (name = "leases", description = "Credential leases: requested in a task, bound to it, revoked at its end or TTL."),
        (name = "approvals", description = "Human approval of high-risk calls, and sign-off of break-glass use."),
        (name = "incident", description = "Responders: mass revocation, fences, reconciliation, blast radius."),
        (name = "events", description = "The tamper-evident event chain."),
        (name = "admin", description = "Policy, statistics and metrics."),
        (name = "tokens", description = "For resource servers: the token provider's keys and RFC 7662 introspection."),
        (name = "probes", description = "Liveness and readiness (no credential)."),
    )
)]
struct Base;

/// The two kinds of caller. Both send `Authorization: Bearer ...`; the
/// roles an operation needs are listed in its security requirement
/// (OpenAPI 3.1 role names for non-OAuth schemes).
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut workload = Http::new(HttpAuthScheme::Bearer);
        workload.bearer_format = Some("JWT".into());
        workload.description = Some(
            "A workload's JWT (e.g. a Kubernetes projected service-account token or a SPIFFE \
             JWT-SVID), verified against the configured issuers: pinned algorithms, `iss`, `aud`, \
             `exp`, `nbf`. A workload sees only its own tasks and leases."
                .into(),
        );
        components.add_security_scheme("workload", SecurityScheme::Http(workload));
        let mut operator = Http::new(HttpAuthScheme::Bearer);
        operator.description = Some(
            "An operator token from the configuration, with one or more roles: `admin`, \
             `responder`, `approver`, `resource_server`, `proxy`."
                .into(),
        );
        components.add_security_scheme("operator", SecurityScheme::Http(operator));
    }
}

fn error_response(description: &str) -> RefOr<OaResponse> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

/// A set of error responses, all with the [`wire::ErrorBody`] shape.
macro_rules! error_set {
    ($(#[$doc:meta])* $name:ident { $($status:literal => $desc:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<OaResponse>> {
                [$(($status.to_string(), error_response($desc))),*].into_iter().collect()
            }
        }
    };
}

error_set!(
    /// Every authenticated operation.
    Guarded {
        "401" => "`unauthenticated`: no credential, or one that does not verify (with `WWW-Authenticate`).",
        "403" => "`forbidden` and other refusals: the caller's roles do not allow this.",
        "429" => "`rate_limited` (per workload, per address), `auth_rate_limited` (authentication failures from this address), `caller_over_share` (this caller already has its share of requests or long-polls in flight), or a quota; with `Retry-After`.",
        "500" => "`internal`: a bug; the detail is in the broker log.",
        "503" => "`overloaded` or `request_timeout` (with `Retry-After`), `store_unavailable` or `provider_unavailable`: retry later.",
    }
);

error_set!(
    /// Operations that take a JSON body.
    WithBody {
        "400" => "Invalid input, with a stable code naming what: `invalid_request` (names the field), `malformed_json`, `invalid_id`, `invalid_parameter`, ...",
        "413" => "`payload_too_large`: the body is over `server.max_body_bytes`.",
        "415" => "`unsupported_media_type`: send `Content-Type: application/json`.",
    }
);

error_set!(
    /// Operations on one resource named in the path.
    WithId {
        "400" => "Invalid input, with a stable code naming what: `invalid_request` (names the field), `malformed_json`, `invalid_id`, `invalid_parameter`, ...",
        "404" => "`*_not_found`: no such resource, or one the caller may not see.",
    }
);

error_set!(
    /// Operations with query parameters.
    WithQuery {
        "400" => "Invalid input, with a stable code naming what: `invalid_request` (names the field), `malformed_json`, `invalid_id`, `invalid_parameter`, ...",
    }
);

error_set!(
    /// Operations without a credential that still pass the per-address limit.
    Public {
        "429" => "`rate_limited`: too many requests from this address; with `Retry-After`.",
        "503" => "`overloaded`: too many requests in flight; with `Retry-After`.",
    }
);

error_set!(
    /// Operations that call a provider.
    CallsProvider {
        "502" => "`provider_error`: the provider refused the request (detail in the broker log).",
        "503" => "`provider_unavailable` or `store_unavailable`: retry later.",
    }
);

error_set!(
    /// Conflicts with the current state.
    Conflict {
        "409" => "The resource is not in a state that allows this (e.g. `task_not_open`, `approval_decided`).",
    }
);

/// The whole document: the base (info, security schemes, tags, error
/// shape) merged with every route's operations.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = Base::openapi();
    let (_, paths) = super::routes().split_for_parts();
    doc.merge(paths);
    doc
}

/// The document as pretty JSON, for `leasehold openapi`.
pub fn document_json() -> Result<String, serde_json::Error> {
    document().to_pretty_json()
}
