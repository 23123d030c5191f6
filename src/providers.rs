//! Building the configured providers (a closed set, chosen by `type`).
//!
//! Each entry keeps its self-description, checked once at build time, so a
//! request for an unknown provider or role is refused before any intent is
//! written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use leasehold_provider::{Description, Provider, Timestamp};
use leasehold_provider_token::{Denylist, TokenProvider, TokenRole, TokenSettings};

use crate::config::ProviderConfig;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
#[error("provider `{name}`: {message}")]
pub struct BuildError {
    pub name: String,
    pub message: String,
}

/// One configured provider instance.
#[derive(Debug, Clone)]
pub struct ProviderEntry {
    pub name: String,
    pub provider: Arc<dyn Provider>,
    pub description: Description,
    /// Set for token providers, which also serve JWKS and introspection.
    pub token: Option<Arc<TokenProvider>>,
    /// Set for PostgreSQL providers (their templates can be dry-run).
    pub postgres: Option<Arc<leasehold_provider_postgres::PostgresProvider>>,
}

impl ProviderEntry {
    /// A provider the broker needs nothing more of than the trait.
    fn plain(name: &str, provider: Arc<dyn Provider>) -> Self {
        Self {
            name: name.to_owned(),
            description: provider.describe(),
            provider,
            token: None,
            postgres: None,
        }
    }
}

/// Every provider of this broker, by name.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    map: BTreeMap<String, ProviderEntry>,
}

impl Providers {
    /// `max_ttl` is the broker's lease ceiling (`limits.max_lease_ttl_seconds`).
    pub fn build(
        cfg: &BTreeMap<String, ProviderConfig>,
        store: &Store,
        max_ttl: u64,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Self, BuildError> {
        let mut map = BTreeMap::new();
        for (name, pc) in cfg {
            let err = |message: String| BuildError {
                name: name.clone(),
                message,
            };
            let entry = match pc {
                ProviderConfig::Token(t) => {
                    let key = zeroize::Zeroizing::new(std::fs::read(&t.signing_key_file).map_err(
                        |e| {
                            err(format!(
                                "cannot read signing key {}: {e}",
                                t.signing_key_file.display()
                            ))
                        },
                    )?);
                    let settings = TokenSettings {
                        issuer: t.issuer.clone(),
                        audience: t.audience.clone(),
                        roles: t
                            .roles
                            .iter()
                            .map(|(n, r)| {
                                (
                                    n.clone(),
                                    TokenRole {
                                        scopes: r.scopes.clone(),
                                        max_ttl: Duration::from_secs(r.max_ttl_seconds),
                                        audience: r.audience.clone(),
                                        description: r.description.clone(),
                                    },
                                )
                            })
                            .collect(),
                    };
                    let denylist = Arc::new(StoreDenylist {
                        store: store.clone(),
                    });
                    let p = Arc::new(
                        TokenProvider::new(settings, &key, denylist)
                            .map_err(|e| err(e.to_string()))?,
                    );
                    ProviderEntry {
                        name: name.clone(),
                        description: p.describe(),
                        provider: p.clone(),
                        token: Some(p),
                        postgres: None,
                    }
                }
                ProviderConfig::Postgres(pc) => {
                    let p = Arc::new(
                        leasehold_provider_postgres::PostgresProvider::new(pc.clone(), max_ttl)
                            .map_err(|e| err(e.to_string()))?,
                    );
                    ProviderEntry {
                        name: name.clone(),
                        description: p.describe(),
                        provider: p.clone(),
                        token: None,
                        postgres: Some(p),
                    }
                }
                ProviderConfig::AwsSts(ac) => {
                    let c = clock.clone();
                    let p = leasehold_provider_aws_sts::AwsStsProvider::new(
                        ac.clone(),
                        max_ttl,
                        Arc::new(move || c.now()),
                        None,
                    )
                    .map_err(|e| err(e.to_string()))?;
                    ProviderEntry::plain(name, Arc::new(p))
                }
                ProviderConfig::Azure(ac) => {
                    let p = leasehold_provider_azure::AzureProvider::new(ac.clone(), max_ttl)
                        .map_err(|e| err(e.to_string()))?;
                    ProviderEntry::plain(name, Arc::new(p))
                }
                ProviderConfig::Vault(vc) => {
                    let p = leasehold_provider_vault::VaultProvider::new(vc.clone(), max_ttl)
                        .map_err(|e| err(e.to_string()))?;
                    ProviderEntry::plain(name, Arc::new(p))
                }
            };
            map.insert(name.clone(), entry);
        }
        Ok(Self { map })
    }

    /// Register an already-built provider (tests inject failing peers).
    pub fn insert(&mut self, name: &str, provider: Arc<dyn Provider>) {
        self.map
            .insert(name.to_owned(), ProviderEntry::plain(name, provider));
    }

    pub fn get(&self, name: &str) -> Option<&ProviderEntry> {
        self.map.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ProviderEntry> {
        self.map.values()
    }

    pub fn tokens(&self) -> impl Iterator<Item = &Arc<TokenProvider>> {
        self.map.values().filter_map(|e| e.token.as_ref())
    }
}

/// The token provider's denylist on the broker's durable store: a
/// revocation is acknowledged only once it is committed.
#[derive(Debug)]
pub struct StoreDenylist {
    store: Store,
}

impl StoreDenylist {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Denylist for StoreDenylist {
    async fn deny(&self, entries: &[(String, Timestamp)]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        let entries = entries
            .iter()
            .map(|(j, t)| {
                j.parse::<crate::ids::LeaseId>()
                    .map(|id| (id.0, t.unix_millis()))
                    .map_err(|_| format!("token id `{}` is not a lease id", j.escape_default()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.store
            .write(move |t| t.deny(&entries))
            .await
            .map_err(|e| e.to_string())
    }

    fn is_denied(&self, jti: &str) -> Result<bool, String> {
        // Every token we sign carries a lease id; anything else is not ours
        // and is treated as inactive.
        let Ok(id) = jti.parse::<crate::ids::LeaseId>() else {
            // still touch the store, so a health check through here is real
            return self.store.read().map(|_| true).map_err(|e| e.to_string());
        };
        self.store
            .read()
            .and_then(|r| r.is_denied(id.0))
            .map_err(|e| e.to_string())
    }
}

/// `config validate`: dry-run every PostgreSQL role template against its
/// database in a transaction that is rolled back. A database that cannot be
/// reached is reported and skipped (the health check runs the same dry run
/// once it is up); a template or privilege error fails, naming the provider
/// and the template.
pub async fn dry_run(config: &crate::config::Config) -> Result<(), BuildError> {
    for (name, pc) in &config.providers {
        let ProviderConfig::Postgres(p) = pc else {
            continue;
        };
        let err = |message: String| BuildError {
            name: name.clone(),
            message,
        };
        let provider = leasehold_provider_postgres::PostgresProvider::new(
            p.clone(),
            config.limits.max_lease_ttl_seconds,
        )
        .map_err(|e| err(e.to_string()))?;
        match provider.check_templates().await {
            Ok(()) => eprintln!(
                "providers.{name}: every role template passed a dry run against {}:{}/{}",
                p.host, p.port, p.database
            ),
            Err(e) if e.is_retryable() => {
                eprintln!(
                    "providers.{name}: not dry-run ({}); the health check will run it once the database is reachable",
                    e.message
                );
            }
            Err(e) => return Err(err(e.message)),
        }
    }
    Ok(())
}
