//! The registry entry of the Vault/OpenBao provider (`type = "vault"`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use leasehold_provider::{BrokerLimits, BuildContext, Built, ConfigError, ProviderSettings};

use crate::{VaultConfig, VaultProvider};

/// The registry entry of the Vault/OpenBao provider.
pub static KIND: leasehold_provider::Kind<VaultConfig> = leasehold_provider::Kind::new();

impl ProviderSettings for VaultConfig {
    const TYPE: &'static str = "vault";

    fn roles(&self) -> Vec<(&str, u64)> {
        leasehold_provider::role_ttls(&self.roles, |r| r.max_ttl_seconds)
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        VaultConfig::validate(self, limits.max_lease_ttl_seconds)
    }

    fn files(&self) -> Vec<(&'static str, &Path)> {
        VaultConfig::files(self)
            .into_iter()
            .map(|(k, f)| (k, f.as_path()))
            .collect()
    }

    fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        VaultConfig::files_mut(self)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let p = VaultProvider::new(self.clone(), ctx.limits.max_lease_ttl_seconds)
            .map_err(|e| e.to_string())?;
        Ok(Built::plain(Arc::new(p)))
    }
}
