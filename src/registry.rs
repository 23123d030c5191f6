//! The provider kinds this broker knows: one line per kind.
//!
//! Adding a provider is its crate, one line in [`BUILTIN`] and one Cargo
//! line; nothing else in `src/` names a kind. A kind parses, validates and
//! builds itself through `leasehold_provider::ProviderSettings`. A build
//! that embeds the broker (or a test) may add kinds with [`register`]
//! before it loads a configuration. A provider that is not compiled in runs
//! as a plugin: `type = "plugin"` names its program (`leasehold_plugin`).

use std::sync::RwLock;

use leasehold_provider::ProviderKind;

/// The kinds compiled into this broker.
pub static BUILTIN: &[&dyn ProviderKind] = &[
    &leasehold_provider_token::KIND,
    &leasehold_provider_postgres::KIND,
    &leasehold_provider_vault::KIND,
    &leasehold_provider_aws_sts::KIND,
    &leasehold_provider_azure::KIND,
    &leasehold_provider_mysql::KIND,
    // a provider in its own process, speaking gRPC (providers/plugin)
    &leasehold_plugin::KIND,
];

/// Kinds registered at run time, after the built-in ones.
static EXTRA: RwLock<Vec<&'static dyn ProviderKind>> = RwLock::new(Vec::new());

/// Why a kind was not registered.
#[derive(Debug, thiserror::Error)]
#[error("provider type `{0}` is already registered")]
pub struct AlreadyRegistered(pub &'static str);

/// Add a kind to this process's registry. Its `type` must be new.
pub fn register(kind: &'static dyn ProviderKind) -> Result<(), AlreadyRegistered> {
    let mut extra = EXTRA
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let name = kind.type_name();
    if find_in(&extra, name).is_some() {
        return Err(AlreadyRegistered(name));
    }
    extra.push(kind);
    Ok(())
}

fn find_in(extra: &[&'static dyn ProviderKind], name: &str) -> Option<&'static dyn ProviderKind> {
    BUILTIN
        .iter()
        .chain(extra.iter())
        .find(|k| k.type_name() == name)
        .copied()
}

/// The kind written as `type = name`.
pub fn find(name: &str) -> Option<&'static dyn ProviderKind> {
    let extra = EXTRA
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    find_in(&extra, name)
}

/// Every known `type`, built-in first.
pub fn type_names() -> Vec<&'static str> {
    let extra = EXTRA
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    BUILTIN
        .iter()
        .chain(extra.iter())
        .map(|k| k.type_name())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_types_are_unique_and_found() {
        let names = type_names();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "{names:?}");
        for n in [
            "token", "postgres", "vault", "aws-sts", "azure", "mysql", "plugin",
        ] {
            assert_eq!(find(n).map(|k| k.type_name()), Some(n));
        }
        assert!(find("nope").is_none());
        assert!(register(&leasehold_provider_token::KIND).is_err());
    }
}
