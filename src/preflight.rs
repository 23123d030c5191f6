//! `config validate`'s checks that load files: keys, the policy set, JWKS,
//! TLS material and each provider's own files. `serve` runs them before it
//! binds. They live above `config`, which parses and checks values but
//! knows no loader.

use crate::config::{Config, ConfigError, invalid};
use crate::policy::RoleEntity;

/// Every configured role as the policy engine sees it.
pub fn role_entities(config: &Config) -> Vec<RoleEntity> {
    config
        .provider_roles()
        .into_iter()
        .map(|(provider, role, max_ttl)| RoleEntity {
            provider,
            role,
            max_ttl,
        })
        .collect()
}

/// Check every file the config names is readable and well-formed,
/// without printing any secret. `serve` and `config validate` run it.
pub fn check_files(config: &Config) -> Result<(), ConfigError> {
    if let Some(p) = &config.store.key_file {
        crate::store::StoreKey::from_file(p)
            .map_err(|e| invalid("store.key_file", e.to_string()))?;
    }
    let cp = std::fs::read(&config.audit.checkpoint_key_file).map_err(|e| {
        invalid(
            "audit.checkpoint_key_file",
            format!("{}: {e}", config.audit.checkpoint_key_file.display()),
        )
    })?;
    crate::audit::CheckpointKey::from_pkcs8(&cp)
        .map_err(|e| invalid("audit.checkpoint_key_file", e))?;
    if let Some(p) = &config.audit.hmac_key_file {
        crate::store::StoreKey::from_file(p)
            .map_err(|e| invalid("audit.hmac_key_file", e.to_string()))?;
    }
    if let Some(p) = &config.policy.webhook_secret_file {
        crate::store::StoreKey::from_file(p)
            .map_err(|e| invalid("policy.webhook_secret_file", e.to_string()))?;
    }
    crate::policy::PolicyEngine::load(&config.policy.dir, role_entities(config)).map_err(|e| {
        invalid(
            "policy.dir",
            format!("the policy set does not validate:\n{e}"),
        )
    })?;
    if let Some(tls) = &config.server.tls {
        for (k, p) in [
            ("server.tls.cert_file", &tls.cert_file),
            ("server.tls.key_file", &tls.key_file),
        ] {
            std::fs::metadata(p).map_err(|e| invalid(k, format!("{}: {e}", p.display())))?;
        }
    }
    for (i, iss) in config.auth.workload_issuers.iter().enumerate() {
        if let Some(p) = &iss.jwks_file {
            crate::auth::load_jwks_file(p)
                .map_err(|e| invalid(format!("auth.workload_issuers[{i}].jwks_file"), e))?;
        }
        if let Some(p) = &iss.trust_bundle_file {
            crate::auth::load_bundle(p)
                .map_err(|e| invalid(format!("auth.workload_issuers[{i}].trust_bundle_file"), e))?;
        }
    }
    for (name, p) in &config.providers {
        p.settings()
            .check_files()
            .map_err(|e| invalid(format!("providers.{name}.{}", e.field), e.message))?;
    }
    Ok(())
}
