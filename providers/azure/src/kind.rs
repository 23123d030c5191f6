//! The registry entry of the Azure provider (`type = "azure"`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use leasehold_provider::{BrokerLimits, BuildContext, Built, ConfigError, Kind, ProviderSettings};

use crate::{AzureConfig, AzureProvider};

/// The registry entry of the Azure provider.
pub static KIND: Kind<AzureConfig> = Kind::new();

impl ProviderSettings for AzureConfig {
    const TYPE: &'static str = "azure";

    fn roles(&self) -> Vec<(&str, u64)> {
        leasehold_provider::role_ttls(&self.roles, |r| r.max_ttl_seconds)
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        AzureConfig::validate(self, limits.max_lease_ttl_seconds)?;
        // an issue that waits out ARM's replication longer than the broker
        // waits for the provider would always time out
        if self.propagation_timeout_seconds >= limits.provider_timeout_seconds {
            return Err(ConfigError::new(
                "propagation_timeout_seconds",
                format!(
                    "must be below reaper.provider_timeout_seconds ({})",
                    limits.provider_timeout_seconds
                ),
            ));
        }
        Ok(())
    }

    fn files(&self) -> Vec<(&'static str, &Path)> {
        AzureConfig::files(self)
            .into_iter()
            .map(|(k, f)| (k, f.as_path()))
            .collect()
    }

    fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        AzureConfig::files_mut(self)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let p = AzureProvider::new(self.clone(), ctx.limits.max_lease_ttl_seconds)
            .map_err(|e| e.to_string())?;
        Ok(Built::plain(Arc::new(p)))
    }
}
