//! For resource servers: RFC 7662 introspection and the JWKS.

use super::openapi::{Guarded, Public};
use super::wire::ErrorBody;
use super::{ApiError, AppState};
use crate::auth::Caller;
use axum::Json;
use axum::extract::{Form, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

#[utoipa::path(
    post,
    path = "/v1/introspect",
    tag = "tokens",
    operation_id = "introspect",
    security(("operator" = ["resource_server", "admin"])),
    request_body(content = IntrospectBody, content_type = "application/x-www-form-urlencoded"),
    responses(Guarded, (status = 200, description = "RFC 7662: `active` false for unknown, revoked or expired tokens.", body = IntrospectionView), (status = 400, description = "`invalid_request`: `token` missing or not a form.", body = ErrorBody))
)]
/// RFC 7662 token introspection, for resource servers.
pub async fn introspect(
    State(s): State<AppState>,
    caller: Caller,
    form: Result<Form<IntrospectBody>, axum::extract::rejection::FormRejection>,
) -> Result<Response, ApiError> {
    s.broker.may_introspect(&caller)?;
    let Form(body) = form.map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!(
                "send `token` as application/x-www-form-urlencoded (RFC 7662): {}",
                e.body_text()
            ),
        )
    })?;
    let _hint = body.token_type_hint;
    let answer = s.broker.introspect(&caller, &body.token)?;
    Ok(Json(IntrospectionView::from(answer)).into_response())
}

#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "tokens",
    operation_id = "jwks",
    responses(Public, (status = 200, description = "The public keys of every token provider.", body = JwkSet))
)]
/// The public keys of every token provider.
pub async fn jwks(State(s): State<AppState>) -> Json<JwkSet> {
    Json(JwkSet {
        keys: s.broker.jwks(),
    })
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct IntrospectBody {
    pub token: String,
    #[serde(default)]
    pub token_type_hint: Option<String>,
}

/// RFC 7662: an inactive token says nothing else; an active one carries
/// its claims.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct IntrospectionView {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// The lease id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The user the task acts for (RFC 8693 `act`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<ActorView>,
    /// The key the token is bound to (RFC 7800): `{"jkt": ...}` for DPoP
    /// (RFC 9449), `{"x5t#S256": ...}` for a client certificate (RFC
    /// 8705). A resource server must see that key proven with the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub cnf: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActorView {
    pub sub: String,
}

impl From<leasehold_provider::TokenInfo> for IntrospectionView {
    fn from(i: leasehold_provider::TokenInfo) -> Self {
        Self {
            active: i.active,
            iss: i.iss,
            sub: i.sub,
            aud: i.aud,
            iat: i.iat,
            nbf: i.nbf,
            exp: i.exp,
            jti: i.jti,
            task: i.task,
            role: i.role,
            scope: i.scope,
            tenant: i.tenant,
            act: i.act.map(|sub| ActorView { sub }),
            cnf: i.cnf.as_ref().map(leasehold_provider::KeyBinding::cnf),
            token_type: i.token_type,
        }
    }
}

/// One public key (RFC 7517).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Jwk)]
pub struct JwkSchema {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JwkSet {
    #[schema(value_type = Vec<JwkSchema>)]
    pub keys: Vec<serde_json::Value>,
}
