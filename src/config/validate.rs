//! [`Config::validate`]: the semantic checks types cannot express
//! (ranges, exclusive options, the loopback-without-TLS rule, unsafe
//! algorithms), section by section, each error naming its field. Provider
//! tables are checked by their kinds.

use std::collections::BTreeSet;

use super::*;

/// Signature algorithms a workload issuer may pin. HMAC is absent on
/// purpose: a shared secret cannot identify a workload, and accepting it is
/// how RSA/HMAC key confusion happens.
pub const ALLOWED_ALGORITHMS: &[&str] = &[
    "EdDSA", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
];

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Config {
    /// Semantic checks that types cannot express, section by section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_store()?;
        self.validate_limits()?;
        self.validate_auth()?;
        self.validate_audit()?;
        self.validate_retention()?;
        self.validate_policy()?;
        self.validate_providers()
    }

    /// Checks of the listener, TLS, bodies, timeouts and rate limits.
    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.tls.is_none() && !s.listen.ip().is_loopback() && !s.allow_plaintext_non_loopback {
            return Err(invalid(
                "server.listen",
                format!(
                    "{} is not a loopback address and no [server.tls] is configured; \
                     configure TLS, or set server.allow_plaintext_non_loopback = true if a \
                     TLS-terminating proxy on this host fronts the broker",
                    s.listen
                ),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&s.max_body_bytes) {
            return Err(invalid(
                "server.max_body_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if s.request_timeout_seconds == 0 {
            return Err(invalid(
                "server.request_timeout_seconds",
                "must be positive",
            ));
        }
        if s.drain_delay_seconds > 300 {
            return Err(invalid("server.drain_delay_seconds", "at most 300"));
        }
        if let Some((field, message)) = s.rate_limits.problem() {
            return Err(invalid(format!("server.rate_limits.{field}"), message));
        }
        if let Some((field, message)) = s.connections.problem() {
            return Err(invalid(format!("server.connections.{field}"), message));
        }
        if let Some(m) = s.metrics_listen
            && m == s.listen
        {
            return Err(invalid(
                "server.metrics_listen",
                "must differ from server.listen",
            ));
        }
        Ok(())
    }

    /// Checks of the store: its key, cache, log and group commit.
    fn validate_store(&self) -> Result<(), ConfigError> {
        match (&self.store.key_file, &self.store.key_env) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "store.key_file",
                    "set either store.key_file or store.key_env, not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "store.key_file",
                    "the store key is required: set store.key_file or store.key_env",
                ));
            }
            _ => {}
        }
        match (self.store.backend, &self.store.postgres) {
            (StoreBackend::Redb, Some(_)) => {
                return Err(invalid(
                    "store.postgres",
                    "set only with store.backend = \"postgres\"",
                ));
            }
            (StoreBackend::Redb, None) if self.store.path.as_os_str().is_empty() => {
                return Err(invalid("store.path", "the store file is required"));
            }
            (StoreBackend::Postgres, None) => {
                return Err(invalid(
                    "store.postgres",
                    "store.backend = \"postgres\" needs a [store.postgres] section",
                ));
            }
            (StoreBackend::Postgres, Some(pg)) => pg.validate()?,
            _ => {}
        }
        if self.store.cache_mib == 0 {
            return Err(invalid("store.cache_mib", "must be positive"));
        }
        if !(1..=1024).contains(&self.store.checkpoint_mib) {
            return Err(invalid("store.checkpoint_mib", "between 1 and 1024"));
        }
        if self.store.commit_delay_micros > 10_000 {
            return Err(invalid(
                "store.commit_delay_micros",
                "at most 10000 (10 ms)",
            ));
        }
        Ok(())
    }

    /// Checks of task and lease ceilings, and the reaper's retries.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_task_ttl_seconds == 0 || l.max_task_ttl_seconds > 7 * 86_400 {
            return Err(invalid(
                "limits.max_task_ttl_seconds",
                "must be between 1 and 604800",
            ));
        }
        if l.max_lease_ttl_seconds == 0 || l.max_lease_ttl_seconds > l.max_task_ttl_seconds {
            return Err(invalid(
                "limits.max_lease_ttl_seconds",
                "must be positive and at most limits.max_task_ttl_seconds",
            ));
        }
        if l.max_leases_per_task == 0 {
            return Err(invalid("limits.max_leases_per_task", "must be positive"));
        }
        let r = &self.reaper;
        if r.retry_base_seconds == 0 || r.retry_cap_seconds < r.retry_base_seconds {
            return Err(invalid(
                "reaper.retry_cap_seconds",
                "retry_base_seconds must be positive and retry_cap_seconds at least as large",
            ));
        }
        if r.retry_budget == 0 {
            return Err(invalid("reaper.retry_budget", "must be positive"));
        }
        if r.irrevocable_retry_seconds == 0 {
            return Err(invalid(
                "reaper.irrevocable_retry_seconds",
                "must be positive",
            ));
        }
        if !(1..=65_536).contains(&r.batch_size) {
            return Err(invalid("reaper.batch_size", "must be between 1 and 65536"));
        }
        if r.provider_timeout_seconds == 0 {
            return Err(invalid(
                "reaper.provider_timeout_seconds",
                "must be positive",
            ));
        }
        Ok(())
    }

    /// Checks of retention: a window, batches that stay short, and an
    /// archive for events pruned.
    fn validate_retention(&self) -> Result<(), ConfigError> {
        let r = &self.retention;
        if r.keep_ended_seconds < 60 {
            return Err(invalid(
                "retention.keep_ended_seconds",
                "must be at least 60: ended tasks stay readable at least that long",
            ));
        }
        if !(1..=86_400).contains(&r.interval_seconds) {
            return Err(invalid(
                "retention.interval_seconds",
                "must be between 1 and 86400",
            ));
        }
        if !(1..=100_000).contains(&r.batch_records) {
            return Err(invalid(
                "retention.batch_records",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=1_000_000).contains(&r.prune_step_events) {
            return Err(invalid(
                "retention.prune_step_events",
                "must be between 1 and 1000000",
            ));
        }
        if r.archive_max_events < r.prune_step_events {
            return Err(invalid(
                "retention.archive_max_events",
                "must be at least retention.prune_step_events",
            ));
        }
        if r.archive_events == Some(true) && self.audit.archive_dir.is_none() {
            return Err(invalid(
                "retention.archive_events",
                "needs audit.archive_dir: events are pruned only into an archive the broker writes and verifies",
            ));
        }
        Ok(())
    }

    /// Checks of the chain: checkpoints and keyed fields.
    fn validate_audit(&self) -> Result<(), ConfigError> {
        let a = &self.audit;
        if a.checkpoint_interval_seconds == 0 || a.checkpoint_interval_seconds > 86_400 {
            return Err(invalid(
                "audit.checkpoint_interval_seconds",
                "must be between 1 and 86400",
            ));
        }
        if let Some(f) = a
            .hmac_fields
            .iter()
            .find(|f| !HMAC_FIELDS.contains(&f.as_str()))
        {
            return Err(invalid(
                "audit.hmac_fields",
                format!(
                    "`{f}` cannot be HMAC-ed; choose from {}",
                    HMAC_FIELDS.join(", ")
                ),
            ));
        }
        if !a.hmac_fields.is_empty() && a.hmac_key_file.is_none() {
            return Err(invalid(
                "audit.hmac_key_file",
                "hmac_fields needs hmac_key_file",
            ));
        }
        Ok(())
    }

    /// Checks of approvals, break-glass and the webhook.
    fn validate_policy(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let p = &self.policy;
        if !(60..=86_400).contains(&p.approval_ttl_seconds) {
            return Err(invalid(
                "policy.approval_ttl_seconds",
                "must be between 60 and 86400",
            ));
        }
        if p.break_glass_max_ttl_seconds == 0
            || p.break_glass_max_ttl_seconds > l.max_lease_ttl_seconds
        {
            return Err(invalid(
                "policy.break_glass_max_ttl_seconds",
                "must be positive and at most limits.max_lease_ttl_seconds",
            ));
        }
        if p.max_active_leases_per_workload == 0 {
            return Err(invalid(
                "policy.max_active_leases_per_workload",
                "must be positive",
            ));
        }
        if let Some(u) = &p.webhook_url {
            let loopback = u.starts_with("http://127.0.0.1")
                || u.starts_with("http://localhost")
                || u.starts_with("http://[::1]");
            if !u.starts_with("https://") && !loopback {
                return Err(invalid(
                    "policy.webhook_url",
                    "must be https (http only on loopback)",
                ));
            }
        }
        Ok(())
    }

    /// Checks of each provider, through its kind's own checks.
    fn validate_providers(&self) -> Result<(), ConfigError> {
        if self.providers.is_empty() {
            return Err(invalid("providers", "configure at least one provider"));
        }
        for (name, p) in &self.providers {
            let field = format!("providers.{name}");
            if !is_name(name) {
                return Err(invalid(field, "provider names are 1-64 of [A-Za-z0-9_-]"));
            }
            let own = p.settings().validate(&self.broker_limits());
            own.map_err(|e| invalid(format!("{field}.{}", e.field), e.message))?;
            if let Some((role, _)) = p.role_ttls().into_iter().find(|(r, _)| !is_name(r)) {
                return Err(invalid(
                    format!("{field}.roles.{role}"),
                    "role names are 1-64 of [A-Za-z0-9_-]",
                ));
            }
        }
        Ok(())
    }

    fn validate_jwt_issuer(
        iss: &IssuerConfig,
        f: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        for (k, set) in [
            ("trust_bundle_file", iss.trust_bundle_file.is_some()),
            ("trust_domain", iss.trust_domain.is_some()),
            ("subject_pattern", iss.subject_pattern.is_some()),
            ("tenant_path_segment", iss.tenant_path_segment.is_some()),
            (
                "tenant_subject_attribute",
                iss.tenant_subject_attribute.is_some(),
            ),
        ] {
            if set {
                return Err(invalid(f(k), "only for kind = \"x509\" issuers"));
            }
        }
        if iss.issuer.is_empty() {
            return Err(invalid(f("issuer"), "must be non-empty and unique"));
        }
        if iss.audiences.is_empty() || iss.audiences.iter().any(String::is_empty) {
            return Err(invalid(
                f("audiences"),
                "list at least one non-empty audience",
            ));
        }
        if iss.algorithms.is_empty() {
            return Err(invalid(f("algorithms"), "pin at least one algorithm"));
        }
        for a in &iss.algorithms {
            if !ALLOWED_ALGORITHMS.contains(&a.as_str()) {
                return Err(invalid(
                    f("algorithms"),
                    format!(
                        "`{a}` is not allowed; use one of {}",
                        ALLOWED_ALGORITHMS.join(", ")
                    ),
                ));
            }
        }
        match (&iss.jwks_file, &iss.jwks_url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(invalid(
                    f("jwks_file"),
                    "set exactly one of jwks_file and jwks_url",
                ));
            }
            (None, Some(url)) => {
                let loopback_http = url.starts_with("http://127.0.0.1")
                    || url.starts_with("http://localhost")
                    || url.starts_with("http://[::1]");
                if !url.starts_with("https://") && !loopback_http {
                    return Err(invalid(
                        f("jwks_url"),
                        "must be https (http only on loopback)",
                    ));
                }
            }
            _ => {}
        }
        if iss.jwks_refresh_seconds < 10 {
            return Err(invalid(f("jwks_refresh_seconds"), "must be at least 10"));
        }
        if iss.leeway_seconds > 300 {
            return Err(invalid(
                f("leeway_seconds"),
                "at most 300 (skew should be small)",
            ));
        }
        if iss.tenant.is_some() && iss.tenant_claim.is_some() {
            return Err(invalid(f("tenant"), "set tenant or tenant_claim, not both"));
        }
        Ok(())
    }

    /// An issuer of client certificates: a trust bundle and exactly what
    /// it may vouch for (a SPIFFE trust domain, or a subject pattern that
    /// is more than a wildcard: no trust in everything a CA signs).
    fn validate_x509_issuer(
        iss: &IssuerConfig,
        f: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        for (k, set) in [
            ("issuer", !iss.issuer.is_empty()),
            ("audiences", !iss.audiences.is_empty()),
            ("algorithms", !iss.algorithms.is_empty()),
            ("jwks_file", iss.jwks_file.is_some()),
            ("jwks_url", iss.jwks_url.is_some()),
            ("tenant_claim", iss.tenant_claim.is_some()),
            ("attribute_claims", !iss.attribute_claims.is_empty()),
        ] {
            if set {
                return Err(invalid(f(k), "only for kind = \"jwt\" issuers"));
            }
        }
        if iss.trust_bundle_file.is_none() {
            return Err(invalid(
                f("trust_bundle_file"),
                "an x509 issuer needs the PEM file of the CAs it trusts",
            ));
        }
        match (&iss.trust_domain, &iss.subject_pattern) {
            (Some(td), None) => {
                if !is_trust_domain(td) {
                    return Err(invalid(
                        f("trust_domain"),
                        "a SPIFFE trust domain: 1-255 of [a-z0-9._-], no wildcard (e.g. prod.example.org)",
                    ));
                }
                if iss.tenant_subject_attribute.is_some() {
                    return Err(invalid(
                        f("tenant_subject_attribute"),
                        "only with subject_pattern; use tenant_path_segment with trust_domain",
                    ));
                }
                if iss.tenant_path_segment == Some(0) {
                    return Err(invalid(f("tenant_path_segment"), "segments count from 1"));
                }
            }
            (None, Some(p)) => {
                if !is_subject_pattern(p) {
                    return Err(invalid(
                        f("subject_pattern"),
                        "a common name of [A-Za-z0-9._-] with at most one `*` standing for one \
                         DNS label, and more than a wildcard (e.g. *.agents.example.org)",
                    ));
                }
                if iss.tenant_path_segment.is_some() {
                    return Err(invalid(
                        f("tenant_path_segment"),
                        "only with trust_domain; use tenant_subject_attribute with subject_pattern",
                    ));
                }
                if let Some(a) = &iss.tenant_subject_attribute
                    && a != "O"
                    && a != "OU"
                {
                    return Err(invalid(f("tenant_subject_attribute"), "`O` or `OU`"));
                }
            }
            _ => {
                return Err(invalid(
                    f("trust_domain"),
                    "set exactly one of trust_domain and subject_pattern",
                ));
            }
        }
        let sources = [
            iss.tenant.is_some(),
            iss.tenant_path_segment.is_some(),
            iss.tenant_subject_attribute.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(invalid(f("tenant"), "set at most one source of the tenant"));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        let mut issuers = BTreeSet::new();
        let mut x509 = false;
        for (i, iss) in self.auth.workload_issuers.iter().enumerate() {
            let f = |k: &str| format!("auth.workload_issuers[{i}].{k}");
            if !is_name(&iss.name) {
                return Err(invalid(f("name"), "1-64 of [A-Za-z0-9_-]"));
            }
            if !names.insert(&iss.name) {
                return Err(invalid(
                    f("name"),
                    format!("duplicate issuer name `{}`", iss.name),
                ));
            }
            match iss.kind {
                IssuerKind::Jwt => {
                    if !issuers.insert(&iss.issuer) && !iss.issuer.is_empty() {
                        return Err(invalid(f("issuer"), "must be non-empty and unique"));
                    }
                    Self::validate_jwt_issuer(iss, &f)?;
                }
                IssuerKind::X509 => {
                    x509 = true;
                    Self::validate_x509_issuer(iss, &f)?;
                }
            }
        }
        if x509 && self.server.tls.is_none() {
            return Err(invalid(
                "auth.workload_issuers",
                "an x509 issuer needs [server.tls]: client certificates arrive only over TLS",
            ));
        }
        if !(1..=600).contains(&self.auth.dpop_max_age_seconds) {
            return Err(invalid("auth.dpop_max_age_seconds", "between 1 and 600"));
        }
        if self.auth.dpop_leeway_seconds > 60 {
            return Err(invalid("auth.dpop_leeway_seconds", "at most 60"));
        }
        if let Some(u) = &self.server.public_url {
            let ok = (u.starts_with("https://") || u.starts_with("http://"))
                && !u.contains(['?', '#', ' '])
                && u.split_once("://").is_some_and(|(_, r)| !r.is_empty());
            if !ok {
                return Err(invalid(
                    "server.public_url",
                    "an http(s) URL without query or fragment, e.g. https://broker.example",
                ));
            }
        }
        let mut op_names = BTreeSet::new();
        let mut hashes = BTreeSet::new();
        for (i, op) in self.auth.operators.iter().enumerate() {
            let f = |k: &str| format!("auth.operators[{i}].{k}");
            if !is_name(&op.name) || !op_names.insert(&op.name) {
                return Err(invalid(f("name"), "1-64 of [A-Za-z0-9_-], unique"));
            }
            if op.roles.is_empty() {
                return Err(invalid(f("roles"), "give at least one role"));
            }
            let h = op.token_sha256.to_ascii_lowercase();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    f("token_sha256"),
                    "must be 64 hex characters (SHA-256)",
                ));
            }
            if !hashes.insert(h) {
                return Err(invalid(f("token_sha256"), "two operators share a token"));
            }
        }
        Ok(())
    }
}

/// A SPIFFE trust domain name: lowercase letters, digits, `.`, `-`, `_`.
pub(crate) fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A subject common-name pattern: at most one `*`, a whole DNS label, and
/// some literal name beside it.
pub(crate) fn is_subject_pattern(p: &str) -> bool {
    let stars = p.matches('*').count();
    let literal = p.len() - stars;
    p.len() <= 255
        && stars <= 1
        && literal >= 3
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b))
        && p.split('.')
            .all(|label| label == "*" || !label.contains('*'))
        && p.split('.').all(|label| !label.is_empty())
}
