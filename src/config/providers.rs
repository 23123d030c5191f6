//! A provider's table: parsed by its kind, found in the registry by
//! `type`, and wrapped so the configuration can hold any kind.

use leasehold_provider::{AnySettings, ProviderSettings};
use serde::{Deserialize, Serialize};

/// One provider instance: its kind's own configuration, found through the
/// registry by `type` (the config knows no kind).
pub struct ProviderConfig(Box<dyn AnySettings>);
impl ProviderConfig {
    /// A provider configured in code (tests, `leasehold dev`).
    pub fn new(settings: impl ProviderSettings) -> Self {
        Self(Box::new(settings))
    }

    /// The `type` written in configuration.
    pub fn kind(&self) -> &'static str {
        self.0.type_name()
    }

    /// Every role the provider offers, with its `max_ttl_seconds`.
    pub fn role_ttls(&self) -> Vec<(&str, u64)> {
        self.0.roles()
    }

    /// The kind's own settings, if they are a `T`.
    pub fn get<T: 'static>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }

    /// The kind's own settings, mutable, if they are a `T`.
    pub fn get_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.0.as_any_mut().downcast_mut()
    }

    pub fn settings(&self) -> &dyn AnySettings {
        self.0.as_ref()
    }

    pub(super) fn settings_mut(&mut self) -> &mut dyn AnySettings {
        self.0.as_mut()
    }
}
impl Clone for ProviderConfig {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}
impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl Serialize for ProviderConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let mut table = toml::Table::new();
        table.insert("type".into(), toml::Value::String(self.kind().into()));
        table.extend(self.0.to_toml().map_err(S::Error::custom)?);
        table.serialize(s)
    }
}
// Dispatch on `type` by hand rather than with serde's internally tagged
// enums, which buffer the table and lose the field path of errors: this way
// "expected u64" comes with "in `roles.demo.max_ttl_seconds`".
impl<'de> Deserialize<'de> for ProviderConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table = toml::Table::deserialize(d)?;
        let kind = match table.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(_) => return Err(D::Error::custom("`type` must be a string")),
            None => {
                return Err(D::Error::custom(format!(
                    "missing field `type` (one of: {})",
                    crate::registry::type_names().join(", ")
                )));
            }
        };
        let Some(k) = crate::registry::find(&kind) else {
            return Err(D::Error::custom(format!(
                "unknown provider type `{kind}`; expected one of: {}",
                crate::registry::type_names().join(", ")
            )));
        };
        k.parse(table).map(Self).map_err(D::Error::custom)
    }
}
