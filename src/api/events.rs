//! `/v1/events`: the chain, filtered; verification; base, head and
//! checkpoints; pruning of archived events.

use super::openapi::{Conflict, Guarded, WithBody, WithQuery};
use super::wire::{
    ApiJson, ApiQuery, MAX_PAGE, ReqId, ctx, parse_lease_id, parse_task_id, time_param,
};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::domain::events::EventFilter;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    operation_id = "events",
    security(("operator" = ["admin", "responder"])),
    params(EventListParams),
    responses(Guarded, WithQuery, (status = 200, description = "Events in chain order.", body = EventList))
)]
/// The event chain, filtered, in order, paged by `after`.
pub async fn events(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<EventListParams>,
) -> Result<Json<EventList>, ApiError> {
    s.broker.may_read_chain(&caller)?;
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    let kind = p
        .kind
        .as_deref()
        .map(|k| {
            crate::audit::EventKind::parse(k).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_parameter",
                    format!("unknown event kind `{}`", k.escape_default()),
                )
            })
        })
        .transpose()?;
    let since = time_param("since", p.since.as_deref())?;
    let until = time_param("until", p.until.as_deref())?;
    if let (Some(a), Some(b)) = (since, until)
        && a >= b
    {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "`since` must be before `until`",
        ));
    }
    let task = p
        .task
        .as_deref()
        .map(parse_task_id)
        .transpose()?
        .map(|t| t.0);
    let lease = match p.lease {
        Some(l) => {
            let id = parse_lease_id(&l)?;
            Some((l, id.0))
        }
        None => None,
    };
    let filter = EventFilter {
        task,
        lease,
        workload: p.workload,
        user: p.user,
        kind,
        since,
        until,
        after: p.after.unwrap_or(0),
        limit,
    };
    let (events, next) = s.broker.events(&caller, filter).await?;
    Ok(Json(EventList {
        events,
        next_cursor: next,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/events/verify",
    tag = "events",
    operation_id = "verify_events",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "The verification report (`ok` false names the first break).", body = crate::audit::verify::VerifyReport))
)]
/// Verify the whole chain and every checkpoint, now.
pub async fn verify_events(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let report = s.broker.verify_chain(&caller).await?;
    Ok(Json(report).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/events/chain",
    tag = "events",
    operation_id = "chain",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "Base, head and signed checkpoints.", body = ChainView))
)]
/// Where the chain starts and ends, and the key its checkpoints verify with.
pub async fn chain(State(s): State<AppState>, caller: Caller) -> Result<Json<ChainView>, ApiError> {
    let c = s.broker.chain_info(&caller)?;
    Ok(Json(ChainView {
        base_seq: c.base.seq,
        base_hash: crate::hex::encode(&c.base.hash),
        head_seq: c.head.seq,
        head_hash: crate::hex::encode(&c.head.hash),
        checkpoint_key: c.checkpoint_key,
        checkpoints: c.checkpoints,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/events/archive",
    tag = "events",
    operation_id = "archive_events",
    security(("operator" = ["admin"])),
    request_body = ArchiveBody,
    responses(Guarded, WithBody, Conflict, (status = 200, description = "Events up to `through_seq` written to an archive in `audit.archive_dir`, verified, then removed; the chain now starts after them.", body = ArchiveView))
)]
/// Archive and prune the oldest events (admin): the broker writes them to a
/// file of its own, verifies it, and only then removes them. Events younger
/// than `audit.prune_min_age_seconds` are never removed.
pub async fn archive_events(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    ApiJson(body): ApiJson<ArchiveBody>,
) -> Result<Json<ArchiveView>, ApiError> {
    let ctx = ctx(rid, caller.principal());
    let a = s
        .broker
        .archive_events(&caller, &ctx, body.through_seq)
        .await?;
    Ok(Json(ArchiveView {
        archive: a.archive.display().to_string(),
        sha256: a.sha256,
        pruned: a.pruned,
        base_seq: a.base_seq,
        checkpoint_seq: a.checkpoint,
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventListParams {
    #[param(pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub task: Option<String>,
    #[param(pattern = "^lease_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub lease: Option<String>,
    #[param(min_length = 1)]
    pub workload: Option<String>,
    #[param(min_length = 1)]
    pub user: Option<String>,
    #[param(min_length = 1)]
    pub kind: Option<String>,
    /// RFC 3339
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// RFC 3339
    #[param(format = DateTime)]
    pub until: Option<String>,
    /// Cursor: events after this seq.
    pub after: Option<u64>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveBody {
    /// Archive and remove events up to and including this seq.
    #[schema(minimum = 1)]
    pub through_seq: u64,
}

/// One event of the chain, as stored (canonical JSON) plus its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Event)]
pub struct EventSchema {
    /// Format version.
    pub v: u32,
    pub seq: u64,
    /// e.g. `task.opened`, `call.decided`, `lease.issued`, `lease.revoked`
    pub kind: String,
    /// RFC 3339 UTC
    pub time: String,
    /// SHA-256 (hex) of the previous event's canonical bytes.
    pub prev_hash: String,
    /// SHA-256 (hex) of this event's canonical bytes.
    pub hash: String,
    /// What happened; the fields depend on `kind`.
    pub data: std::collections::BTreeMap<String, serde_json::Value>,
    /// The ids the event concerns (task, lease, workload, ...).
    pub links: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventList {
    #[schema(value_type = Vec<EventSchema>)]
    pub events: Vec<serde_json::Value>,
    /// Pass as `after` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u64>,
}

/// A signed checkpoint of the chain head.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Checkpoint)]
pub struct CheckpointSchema {
    pub seq: u64,
    pub hash: String,
    pub time: String,
    pub key_id: String,
    /// Ed25519, base64.
    pub signature: String,
}

/// Where the chain starts and ends, and the key its checkpoints verify with.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChainView {
    pub base_seq: u64,
    pub base_hash: String,
    pub head_seq: u64,
    pub head_hash: String,
    pub checkpoint_key: Option<String>,
    #[schema(value_type = Vec<CheckpointSchema>)]
    pub checkpoints: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ArchiveView {
    /// The archive file, on the broker's host.
    pub archive: String,
    /// The archive file's SHA-256, also recorded in the `chain.pruned` event.
    pub sha256: String,
    pub pruned: u64,
    /// Where the chain starts now.
    pub base_seq: u64,
    /// The checkpoint signed over the new head, when there is a key.
    pub checkpoint_seq: Option<u64>,
}
