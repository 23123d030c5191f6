//! Prometheus metrics: what an operator alerts on.
//!
//! Counters and histograms are recorded where things happen (the request
//! middleware, decisions, the issue path, the revocation workers, the store
//! writer) through the `metrics` facade. Gauges that describe the store's
//! state (leases by provider and state, the revocation queue, the chain,
//! approvals, fences, jobs) are read from the store at scrape time, so they
//! are exact and survive restarts (`domain::ops` renders them). This
//! module knows no broker and no store: it names and records. Labels are bounded: routes are templates,
//! never a task or lease id.

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};

use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Seconds: from 0.5 ms (a decision) to 30 s (a provider timing out).
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const OPERATIONS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Install the process-wide recorder (once; later calls share it). `None`
/// if another recorder was installed first (metrics are then not served).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_operations".into()), OPERATIONS));
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(h) => {
                    describe();
                    // a handle is bound to the recorder installed when it
                    // was registered: the cache exists only once ours is
                    HTTP.get_or_init(Default::default);
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "leasehold_http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        "leasehold_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by method and route template."
    );
    describe_counter!(
        "leasehold_connections_refused_total",
        "Connections closed as they arrived because server.connections' cap (total or per_address) was reached."
    );
    describe_counter!(
        "leasehold_caller_over_share_total",
        "Requests refused because their caller already had its share in flight (server.rate_limits.per_caller_*)."
    );
    describe_counter!(
        "leasehold_decisions_total",
        "Policy decisions by action (open_task, call, lease) and outcome."
    );
    describe_counter!(
        "leasehold_lease_transitions_total",
        "Leases that entered a state (issuing, active = issued, revoked, expired, rolled_back, irrevocable, abandoned), by provider; counted at commit."
    );
    describe_counter!(
        "leasehold_revocation_retries_total",
        "Failed revocation attempts (rescheduled, or irrevocable), by provider."
    );
    describe_histogram!(
        "leasehold_provider_call_duration_seconds",
        Unit::Seconds,
        "Provider call latency by provider and operation (issue, revoke)."
    );
    describe_counter!(
        "leasehold_provider_errors_total",
        "Provider call failures by provider, operation and class (retryable, permanent, timeout)."
    );
    describe_histogram!(
        "leasehold_store_commit_duration_seconds",
        Unit::Seconds,
        "Store commit latency (apply + fsync) per batch."
    );
    describe_histogram!(
        "leasehold_store_commit_operations",
        "Operations merged into one store commit."
    );
    describe_gauge!(
        "leasehold_leases",
        "Leases by provider and state, from the store."
    );
    describe_gauge!(
        "leasehold_provider_advisories",
        "What a healthy provider advises acting on before it stops (a PostgreSQL access list half full), by provider; updated whenever readiness is checked (probes, `leasehold status`), the lines in the log and GET /v1/stats."
    );
    describe_gauge!(
        "leasehold_revocation_queue_depth",
        "Leases waiting in the revocation queue (revoking or irrevocable), by provider."
    );
    describe_gauge!(
        "leasehold_revocation_queue_oldest_overdue_seconds",
        Unit::Seconds,
        "How long the most overdue queued revocation has waited past its due time, by provider."
    );
    describe_gauge!(
        "leasehold_event_chain_head_seq",
        "Sequence number of the last event in the chain."
    );
    describe_gauge!(
        "leasehold_event_checkpoint_age_seconds",
        Unit::Seconds,
        "Time since the last signed checkpoint of the chain (-1: none yet)."
    );
    describe_gauge!(
        "leasehold_approvals_pending",
        "Approval requests awaiting a decision."
    );
    describe_gauge!(
        "leasehold_fences_active",
        "Fenced workloads, tenants and users."
    );
    describe_gauge!(
        "leasehold_store_disk_full",
        "1 while writes are refused because the store's filesystem has less than store.reserve_mib free (503 store_full); reads go on."
    );
    describe_counter!(
        "leasehold_store_writes_refused_no_space_total",
        "Store operations refused, nothing written, for lack of space on the store's filesystem."
    );
    describe_counter!(
        "leasehold_store_checkpoints_postponed_total",
        "Checkpoints put off for lack of space (the write-ahead log keeps everything meanwhile)."
    );
    describe_gauge!(
        "leasehold_revocation_jobs_running",
        "Mass revocation jobs still running."
    );
    describe_gauge!(
        "leasehold_provider_orphans",
        "Credentials at a provider's peer that no live lease accounts for, at the last periodic reconciliation."
    );
    describe_gauge!(
        "leasehold_cluster_leader",
        "1 while this broker leads (expiry, revocation, jobs, checkpoints run here); a single broker always does."
    );
    describe_counter!(
        "leasehold_cluster_leadership_changes_total",
        "Times this broker gained or lost the leadership."
    );
    describe_gauge!(
        "leasehold_cluster_lease_renewal_age_seconds",
        Unit::Seconds,
        "Time since this broker's last election round reached the database (a leader steps down at 80% of the lease period)."
    );
    describe_gauge!(
        "leasehold_cluster_election_round_seconds",
        Unit::Seconds,
        "Round trip of the last election round (heartbeat and lease renewal)."
    );
    describe_counter!(
        "leasehold_retention_removed_total",
        "Records retention removed, by kind (tasks, leases, calls, approvals, reviews, jobs, events)."
    );
    describe_gauge!(
        "leasehold_retention_last_pass_timestamp_seconds",
        Unit::Seconds,
        "When the last complete retention pass ended (unix time); stale while retention fails or this node does not lead."
    );
    describe_counter!(
        "leasehold_retention_failures_total",
        "Retention passes that stopped on an error (logged; retried at the next interval)."
    );
    describe_gauge!(
        "leasehold_store_pool_connections",
        "The PostgreSQL store's connections for reads, by state (open, idle)."
    );
}

/// The store's room, at scrape time: whether writes are refused for lack
/// of space, how many were, and how many checkpoints were put off.
pub fn store_space(full: bool, refused: u64, postponed: u64) {
    gauge!("leasehold_store_disk_full").set(if full { 1.0 } else { 0.0 });
    counter!("leasehold_store_writes_refused_no_space_total").absolute(refused);
    counter!("leasehold_store_checkpoints_postponed_total").absolute(postponed);
}

/// Records retention removed, by kind.
pub fn retention_removed(kind: &'static str, n: u64) {
    if n > 0 {
        counter!("leasehold_retention_removed_total", "kind" => kind).increment(n);
    }
}

/// A retention pass ended: completely (at `unix_seconds`) or on an error.
pub fn retention_pass(ok: bool, unix_seconds: f64) {
    if ok {
        gauge!("leasehold_retention_last_pass_timestamp_seconds").set(unix_seconds);
    } else {
        counter!("leasehold_retention_failures_total").increment(1);
    }
}

/// The cluster's gauges, at scrape time.
pub fn cluster(
    leader: bool,
    changes: u64,
    round: Option<(f64, f64)>,
    pool: Option<(usize, usize)>,
) {
    gauge!("leasehold_cluster_leader").set(if leader { 1.0 } else { 0.0 });
    metrics::counter!("leasehold_cluster_leadership_changes_total").absolute(changes);
    if let Some((age, took)) = round {
        gauge!("leasehold_cluster_lease_renewal_age_seconds").set(age);
        gauge!("leasehold_cluster_election_round_seconds").set(took);
    }
    if let Some((open, idle)) = pool {
        gauge!("leasehold_store_pool_connections", "state" => "open").set(open as f64);
        gauge!("leasehold_store_pool_connections", "state" => "idle").set(idle as f64);
    }
}

/// The handles of one (route, method, status) series.
struct HttpSeries {
    method: &'static str,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

/// Series by route template. Registering a labelled metric allocates and
/// hashes its key, on every request; routes, methods and statuses form a
/// small fixed set, so each series is registered once and its handles kept.
/// Set by `install` once our recorder is in place.
static HTTP: OnceLock<RwLock<HashMap<String, Vec<HttpSeries>>>> = OnceLock::new();

/// The method as a label: a client may send any token as a method, and each
/// would otherwise become a series of its own.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *method {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::PATCH => "PATCH",
        M::TRACE => "TRACE",
        M::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// An HTTP request answered: `route` is the matched route template (never
/// the path: ids must not become labels).
pub fn http_request(method: &axum::http::Method, route: &str, status: u16, seconds: f64) {
    let method = method_label(method);
    let register = |route: &str| HttpSeries {
        method,
        status,
        requests: counter!("leasehold_http_requests_total", "method" => method, "route" => route.to_owned(), "status" => status.to_string()),
        duration: histogram!("leasehold_http_request_duration_seconds", "method" => method, "route" => route.to_owned()),
    };
    let record = |s: &HttpSeries| {
        s.requests.increment(1);
        s.duration.record(seconds);
    };
    // no cache before our recorder is installed (see `install`)
    let Some(series) = HTTP.get() else {
        return record(&register(route));
    };
    let find = |v: &Vec<HttpSeries>| {
        v.iter()
            .position(|s| s.method == method && s.status == status)
    };
    {
        let known = series.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = known.get(route)
            && let Some(i) = find(v)
        {
            return record(&v[i]);
        }
    }
    let mut known = series.write().unwrap_or_else(PoisonError::into_inner);
    let v = known.entry(route.to_owned()).or_default();
    let i = find(v).unwrap_or_else(|| {
        v.push(register(route));
        v.len() - 1
    });
    record(&v[i]);
}

/// A connection closed as it arrived: `cap` is `total` or `per_address`.
pub fn connection_refused(cap: &'static str) {
    counter!("leasehold_connections_refused_total", "cap" => cap).increment(1);
}

/// A request refused because its caller had its share in flight.
pub fn caller_over_share() {
    counter!("leasehold_caller_over_share_total").increment(1);
}

pub fn provider_orphans(provider: &str, n: usize) {
    gauge!("leasehold_provider_orphans", "provider" => provider.to_owned()).set(n as f64);
}

pub fn decision(action: &'static str, outcome: &'static str) {
    counter!("leasehold_decisions_total", "action" => action, "outcome" => outcome).increment(1);
}

/// A revocation attempt failed and was rescheduled.
pub fn revocation_retry(provider: &str) {
    counter!("leasehold_revocation_retries_total", "provider" => provider.to_owned()).increment(1);
}

pub fn provider_call(
    provider: &str,
    operation: &'static str,
    seconds: f64,
    error: Option<&'static str>,
) {
    histogram!("leasehold_provider_call_duration_seconds", "provider" => provider.to_owned(), "operation" => operation)
        .record(seconds);
    if let Some(class) = error {
        counter!("leasehold_provider_errors_total", "provider" => provider.to_owned(), "operation" => operation, "class" => class)
            .increment(1);
    }
}

/// A committed batch: its latency, its size, and the lease state changes
/// it made durable.
/// `entered`: (provider, state, how many leases entered it).
pub fn store_commit<'a>(
    seconds: f64,
    operations: usize,
    entered: impl IntoIterator<Item = (&'a str, &'static str, u64)>,
) {
    histogram!("leasehold_store_commit_duration_seconds").record(seconds);
    histogram!("leasehold_store_commit_operations").record(operations as f64);
    for (provider, state, n) in entered {
        counter!("leasehold_lease_transitions_total", "provider" => provider.to_owned(), "state" => state).increment(n);
    }
}
