//! The registry entry of the AWS STS provider (`type = "aws-sts"`).

use std::sync::Arc;

use leasehold_provider::{BrokerLimits, BuildContext, Built, ConfigError, Kind, ProviderSettings};

use crate::{AwsStsConfig, AwsStsProvider};

/// The registry entry of the AWS STS provider.
pub static KIND: Kind<AwsStsConfig> = Kind::new();

impl ProviderSettings for AwsStsConfig {
    const TYPE: &'static str = "aws-sts";

    fn roles(&self) -> Vec<(&str, u64)> {
        leasehold_provider::role_ttls(&self.roles, |r| r.max_ttl_seconds)
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        AwsStsConfig::validate(self, limits.max_lease_ttl_seconds)
    }

    /// The broker's clock goes in: the deny policy's cut-off and its
    /// pruning need "now".
    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let p = AwsStsProvider::new(
            self.clone(),
            ctx.limits.max_lease_ttl_seconds,
            ctx.now.clone(),
            None,
        )
        .map_err(|e| e.to_string())?;
        Ok(Built::plain(Arc::new(p)))
    }
}
