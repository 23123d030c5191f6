//! The registry entry of the MariaDB/MySQL provider (`type = "mysql"`, for
//! running it in process; the plugin binary parses the same type).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use leasehold_provider::{
    BrokerLimits, BuildContext, Built, ConfigError, Kind, ProviderError, ProviderSettings,
};

use crate::{MysqlConfig, MysqlProvider};

pub static KIND: Kind<MysqlConfig> = Kind::new();

#[async_trait::async_trait]
impl ProviderSettings for MysqlConfig {
    const TYPE: &'static str = "mysql";

    fn roles(&self) -> Vec<(&str, u64)> {
        leasehold_provider::role_ttls(&self.roles, |r| r.max_ttl_seconds)
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        MysqlConfig::validate(self, limits.max_lease_ttl_seconds)
    }

    fn files(&self) -> Vec<(&'static str, &Path)> {
        [
            ("password_file", &self.password_file),
            ("ca_file", &self.ca_file),
        ]
        .into_iter()
        .filter_map(|(k, f)| f.as_deref().map(|f| (k, f)))
        .collect()
    }

    fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        [self.password_file.as_mut(), self.ca_file.as_mut()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The management user's privileges, and every role's template run for
    /// a throwaway locked user.
    async fn dry_run(&self, limits: &BrokerLimits) -> Result<Option<String>, ProviderError> {
        let provider = MysqlProvider::new(self.clone(), limits.max_lease_ttl_seconds)
            .map_err(ProviderError::invalid)?;
        provider.check_templates().await?;
        Ok(Some(format!(
            "privileges and every role template checked against {}:{}",
            self.host, self.port
        )))
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let p = MysqlProvider::new(self.clone(), ctx.limits.max_lease_ttl_seconds)?;
        Ok(Built::plain(Arc::new(p)))
    }
}
