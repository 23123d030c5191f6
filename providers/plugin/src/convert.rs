//! Between the provider crate's types and the protocol's messages. Both
//! sides use these, so a field added to one is added to both.

use leasehold_provider::{
    Credential, CredentialValue, ErrorClass, Found, Issued, LeaseSpec, ProviderError,
    RevocationHandle, RevokeSpec, Timestamp,
};

use crate::wire;

pub(crate) fn error_to_wire(e: &ProviderError) -> wire::Error {
    let class = match e.class {
        ErrorClass::Retryable => wire::error::Class::Retryable,
        ErrorClass::Permanent => wire::error::Class::Permanent,
        ErrorClass::Invalid => wire::error::Class::Invalid,
    };
    wire::Error {
        class: class as i32,
        message: e.message.clone(),
    }
}

pub(crate) fn error_from_wire(e: wire::Error) -> ProviderError {
    let class = match wire::error::Class::try_from(e.class) {
        Ok(wire::error::Class::Retryable) => ErrorClass::Retryable,
        Ok(wire::error::Class::Invalid) => ErrorClass::Invalid,
        _ => ErrorClass::Permanent,
    };
    ProviderError {
        class,
        message: e.message,
    }
}

/// `Err` when the plugin answered with an error.
pub(crate) fn outcome(e: Option<wire::Error>) -> Result<(), ProviderError> {
    match e {
        Some(e) => Err(error_from_wire(e)),
        None => Ok(()),
    }
}

pub(crate) fn spec_to_wire(s: &LeaseSpec) -> wire::LeaseSpec {
    wire::LeaseSpec {
        lease_id: s.lease_id.clone(),
        task_id: s.task_id.clone(),
        workload: s.workload.clone(),
        tenant: s.tenant.clone(),
        on_behalf_of: s.on_behalf_of.clone(),
        role: s.role.clone(),
        scope: s.scope.clone(),
        issued_at_ms: s.issued_at.unix_millis(),
        expires_at_ms: s.expires_at.unix_millis(),
        prepared: s.prepared.as_ref().map(|h| h.as_bytes().to_vec()),
    }
}

pub(crate) fn spec_from_wire(s: wire::LeaseSpec) -> LeaseSpec {
    LeaseSpec {
        lease_id: s.lease_id,
        task_id: s.task_id,
        workload: s.workload,
        tenant: s.tenant,
        on_behalf_of: s.on_behalf_of,
        role: s.role,
        scope: s.scope,
        issued_at: Timestamp::from_unix_millis(s.issued_at_ms),
        expires_at: Timestamp::from_unix_millis(s.expires_at_ms),
        prepared: s.prepared.map(RevocationHandle::new),
        // protocol v1 binds nothing: the host reports `BindingSupport::Unsupported`,
        // so the broker never sends a binding to a plugin
        binding: None,
    }
}

pub(crate) fn revoke_to_wire(r: &RevokeSpec) -> wire::RevokeSpec {
    wire::RevokeSpec {
        lease_id: r.lease_id.clone(),
        role: r.role.clone(),
        expires_at_ms: r.expires_at.unix_millis(),
        handle: r.handle.as_bytes().to_vec(),
    }
}

pub(crate) fn revoke_from_wire(r: wire::RevokeSpec) -> RevokeSpec {
    RevokeSpec {
        lease_id: r.lease_id,
        role: r.role,
        expires_at: Timestamp::from_unix_millis(r.expires_at_ms),
        handle: RevocationHandle::new(r.handle),
    }
}

pub(crate) fn credential_to_wire(c: &Credential) -> Vec<wire::CredentialField> {
    c.names()
        .filter_map(|name| {
            Some(wire::CredentialField {
                name: name.to_owned(),
                value: c.expose(name)?.to_owned(),
                secret: matches!(c.get(name), Some(CredentialValue::Secret(_))),
            })
        })
        .collect()
}

pub(crate) fn credential_from_wire(fields: Vec<wire::CredentialField>) -> Credential {
    fields.into_iter().fold(Credential::new(), |c, f| {
        if f.secret {
            c.secret(&f.name, f.value)
        } else {
            c.public(&f.name, f.value)
        }
    })
}

pub(crate) fn issued_to_wire(lease_id: &str, i: &Issued) -> wire::IssueResponse {
    wire::IssueResponse {
        lease_id: lease_id.to_owned(),
        credential: credential_to_wire(&i.credential),
        handle: i.handle.as_bytes().to_vec(),
        expires_at_ms: i.expires_at.unix_millis(),
        description: i.description.clone(),
        error: None,
    }
}

pub(crate) fn found_to_wire(f: &Found) -> wire::Found {
    wire::Found {
        name: f.name.clone(),
        lease_id: f.lease_id.clone(),
    }
}

pub(crate) fn found_from_wire(f: wire::Found) -> Found {
    Found {
        name: f.name,
        lease_id: f.lease_id,
    }
}
