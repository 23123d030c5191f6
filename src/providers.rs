//! The configured providers, built through their kinds' own
//! `ProviderSettings::build` (see `registry`): nothing here names a kind.
//!
//! Each entry keeps its self-description, checked once at build time, so a
//! request for an unknown provider or role is refused before any intent is
//! written.

use std::collections::BTreeMap;
use std::sync::Arc;

use leasehold_provider::{
    BrokerLimits, BuildContext, Denylist, Description, Provider, Timestamp, TokenIssuer,
};

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
    /// Set for providers that issue tokens the broker introspects and
    /// serves keys for; their revocation is an entry in the broker's store.
    pub tokens: Option<Arc<dyn TokenIssuer>>,
}

impl ProviderEntry {
    /// A provider the broker needs nothing more of than the trait.
    fn plain(name: &str, provider: Arc<dyn Provider>) -> Self {
        Self {
            name: name.to_owned(),
            description: provider.describe(),
            provider,
            tokens: None,
        }
    }
}

/// Every provider of this broker, by name.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    map: BTreeMap<String, ProviderEntry>,
}

impl Providers {
    /// Build every configured provider; `limits` are the broker's, `clock`
    /// is handed to providers that need "now".
    pub fn build(
        cfg: &BTreeMap<String, ProviderConfig>,
        store: &Store,
        limits: BrokerLimits,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Self, BuildError> {
        let ctx = BuildContext {
            limits,
            now: Arc::new(move || clock.now()),
            denylist: Arc::new(StoreDenylist::new(store.clone())),
        };
        let mut map = BTreeMap::new();
        for (name, pc) in cfg {
            let built = pc.settings().build(&ctx).map_err(|message| BuildError {
                name: name.clone(),
                message,
            })?;
            let entry = ProviderEntry {
                name: name.clone(),
                description: built.provider.describe(),
                provider: built.provider,
                tokens: built.tokens,
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

    pub fn tokens(&self) -> impl Iterator<Item = &Arc<dyn TokenIssuer>> {
        self.map.values().filter_map(|e| e.tokens.as_ref())
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

/// `config validate`: each provider's dry run against its peer (PostgreSQL:
/// every role template in a transaction that is rolled back). A peer that
/// cannot be reached is reported and skipped (the health check runs the
/// same dry run once it is up); any other failure fails, naming the
/// provider.
pub async fn dry_run(config: &crate::config::Config) -> Result<(), BuildError> {
    let limits = config.broker_limits();
    for (name, pc) in &config.providers {
        match pc.settings().dry_run(&limits).await {
            Ok(Some(what)) => eprintln!("providers.{name}: {what}"),
            Ok(None) => {}
            Err(e) if e.is_retryable() => {
                eprintln!(
                    "providers.{name}: not dry-run ({}); the health check will run it once the peer is reachable",
                    e.message
                );
            }
            Err(e) => {
                return Err(BuildError {
                    name: name.clone(),
                    message: e.message,
                });
            }
        }
    }
    Ok(())
}
