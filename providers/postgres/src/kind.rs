//! The registry entry of the PostgreSQL provider (`type = "postgres"`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use leasehold_provider::{
    BrokerLimits, BuildContext, Built, ConfigError, Kind, ProviderError, ProviderSettings,
};

use crate::{PostgresConfig, PostgresProvider};

/// The registry entry of the PostgreSQL provider.
pub static KIND: Kind<PostgresConfig> = Kind::new();

#[async_trait::async_trait]
impl ProviderSettings for PostgresConfig {
    const TYPE: &'static str = "postgres";

    fn roles(&self) -> Vec<(&str, u64)> {
        leasehold_provider::role_ttls(&self.roles, |r| r.max_ttl_seconds)
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        PostgresConfig::validate(self, limits.max_lease_ttl_seconds)
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

    fn check_files(&self) -> Result<(), ConfigError> {
        for (field, f) in ProviderSettings::files(self) {
            std::fs::metadata(f)
                .map_err(|e| ConfigError::new(field, format!("{}: {e}", f.display())))?;
        }
        if let Some(var) = &self.password_env
            && std::env::var_os(var).is_none()
        {
            return Err(ConfigError::new(
                "password_env",
                format!("{var} is not set"),
            ));
        }
        Ok(())
    }

    /// Every role template, run against the database in a transaction that
    /// is rolled back.
    async fn dry_run(&self, limits: &BrokerLimits) -> Result<Option<String>, ProviderError> {
        let provider = PostgresProvider::new(self.clone(), limits.max_lease_ttl_seconds)
            .map_err(|e| ProviderError::invalid(e.to_string()))?;
        provider.check_templates().await?;
        Ok(Some(format!(
            "every role template passed a dry run against {}:{}/{}",
            self.host, self.port, self.database
        )))
    }

    /// A statement that grants a privilege ON an object TO each lease's
    /// role adds an entry to that object's access list, and the list lives
    /// in one catalog row (a page, 8 KB): past about
    /// [`ACL_CEILING`](crate::ACL_CEILING) concurrent leases the next grant
    /// fails with `row is too big`. Membership in a group role costs the
    /// object nothing, however many leases there are.
    fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, role) in &self.roles {
            for (i, st) in role.statements.iter().enumerate() {
                if crate::grants_on_an_object(st) {
                    out.push(format!(
                        "roles.{name}.statements[{i}] grants on an object to each lease's role: each \
                         concurrent lease adds an entry to that object's access list, which fits one \
                         catalog row, so past about {} leases of this role at once every issue fails \
                         (`row is too big`). Grant to a group role once and list it in `in_roles` \
                         (or `scope_roles`) instead",
                        crate::ACL_CEILING
                    ));
                }
            }
        }
        out
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let p = PostgresProvider::new(self.clone(), ctx.limits.max_lease_ttl_seconds)
            .map_err(|e| e.to_string())?;
        Ok(Built::plain(Arc::new(p)))
    }
}
