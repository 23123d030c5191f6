//! Workload sign-in with TLS client certificates (`kind = "x509"`
//! issuers): X.509-SVIDs of a SPIFFE trust domain, or certificates whose
//! subject matches a pattern, under a trust bundle.
//!
//! The TLS layer (`listen::RequestClientCertificate`) asks for a
//! certificate and checks only that the client holds its key (the
//! handshake's signature); everything else is checked here, per request, so a refused certificate is an ordinary 401 that is
//! recorded like any denied sign-in: the chain to a CA of the bundle at
//! the broker's time (validity, signatures, path length and name
//! constraints, a CA never accepted as a workload's certificate, the
//! clientAuth purpose when the certificate states purposes), and then the
//! identity: exactly one `spiffe://` URI SAN in the configured trust domain
//! with the key usage an SVID must have, or a subject common name that
//! matches the pattern. The bundle is re-read whenever its file changes,
//! so removing a CA from it refuses its certificates at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::{AuthError, Workload};
use crate::clock::Timestamp;
use crate::config::IssuerConfig;

/// The bundle as last read: its file's identity, and the verifier built
/// from it (`None`: the file could not be read or held no CA, so nothing
/// is accepted until it is fixed).
struct Bundle {
    stamp: Option<(SystemTime, u64, u64)>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Bumped on every reload; cached verdicts of older generations are void.
    generation: u64,
}

/// Verifies the client certificates of one issuer.
pub struct X509Verifier {
    cfg: IssuerConfig,
    bundle_file: PathBuf,
    bundle: Mutex<Bundle>,
}

impl std::fmt::Debug for X509Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Verifier")
            .field("name", &self.cfg.name)
            .field("bundle", &self.bundle_file)
            .finish_non_exhaustive()
    }
}

fn stamp_of(path: &std::path::Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Read a PEM bundle into a verifier; the error names what is wrong.
pub fn load_bundle(path: &std::path::Path) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("{}: a CA certificate is unusable: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: holds no CA certificate", path.display()));
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| format!("{}: {e}", path.display()))
}

/// Why a certificate was refused, for the log and the chain; the caller
/// is told only that it was not accepted.
fn refused(reason: impl Into<String>) -> AuthError {
    AuthError::Certificate(reason.into())
}

impl X509Verifier {
    pub fn new(cfg: IssuerConfig) -> Result<Self, String> {
        let bundle_file = cfg
            .trust_bundle_file
            .clone()
            .ok_or_else(|| format!("issuer {}: no trust_bundle_file", cfg.name))?;
        let verifier =
            load_bundle(&bundle_file).map_err(|e| format!("issuer {}: {e}", cfg.name))?;
        Ok(Self {
            bundle: Mutex::new(Bundle {
                stamp: stamp_of(&bundle_file),
                verifier: Some(verifier),
                generation: 0,
            }),
            cfg,
            bundle_file,
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The verifier for the bundle as it is on disk now, and its generation.
    fn current(&self) -> (Option<Arc<dyn ClientCertVerifier>>, u64) {
        let Ok(mut b) = self.bundle.lock() else {
            return (None, 0);
        };
        let stamp = stamp_of(&self.bundle_file);
        if stamp != b.stamp {
            b.stamp = stamp;
            b.generation += 1;
            b.verifier = match load_bundle(&self.bundle_file) {
                Ok(v) => {
                    tracing::info!(issuer = %self.cfg.name, "trust bundle reloaded");
                    Some(v)
                }
                Err(e) => {
                    // fail closed: a bundle we cannot read vouches for no one
                    tracing::error!(issuer = %self.cfg.name, error = %e, "trust bundle unusable; refusing its certificates until it is fixed");
                    None
                }
            };
        }
        (b.verifier.clone(), b.generation)
    }

    /// The bundle's generation, for cached verdicts.
    pub fn generation(&self) -> u64 {
        self.current().1
    }

    /// Does this issuer claim the certificate (its trust domain or subject
    /// pattern), before any signature is checked?
    pub fn claims(&self, leaf: &X509Certificate<'_>) -> bool {
        match (&self.cfg.trust_domain, &self.cfg.subject_pattern) {
            (Some(td), _) => spiffe_ids(leaf)
                .iter()
                .any(|id| parse_spiffe_id(id).is_some_and(|(d, _)| d == td)),
            (None, Some(p)) => common_name(leaf).is_some_and(|cn| matches_pattern(p, &cn)),
            (None, None) => false,
        }
    }

    /// Verify a chain (leaf first) at `now`; returns the workload and when
    /// the leaf expires (ms).
    pub fn verify(
        &self,
        chain: &[CertificateDer<'static>],
        now: Timestamp,
    ) -> Result<(Workload, i64), AuthError> {
        let (leaf_der, intermediates) = chain.split_first().ok_or(AuthError::Missing)?;
        let (verifier, _) = self.current();
        let verifier = verifier.ok_or_else(|| refused("the issuer's trust bundle is unusable"))?;
        let at = UnixTime::since_unix_epoch(Duration::from_millis(
            u64::try_from(now.unix_millis()).unwrap_or(0),
        ));
        verifier
            .verify_client_cert(leaf_der, intermediates, at)
            .map_err(|e| refused(chain_error(&e)))?;
        let (_, leaf) = X509Certificate::from_der(leaf_der.as_ref())
            .map_err(|_| refused("the certificate cannot be parsed"))?;
        let not_after_ms = leaf.validity().not_after.timestamp().saturating_mul(1000);
        let mut attributes = BTreeMap::new();
        let (subject, tenant) = match (&self.cfg.trust_domain, &self.cfg.subject_pattern) {
            (Some(td), _) => {
                let ids = spiffe_ids(&leaf);
                let [id] = ids.as_slice() else {
                    return Err(refused(format!(
                        "an X.509-SVID has exactly one URI SAN; this one has {}",
                        ids.len()
                    )));
                };
                let (domain, path) = parse_spiffe_id(id)
                    .ok_or_else(|| refused("the URI SAN is not a valid SPIFFE ID"))?;
                if domain != td {
                    return Err(refused(format!(
                        "trust domain `{domain}` is not this issuer's"
                    )));
                }
                check_svid_key_usage(&leaf)?;
                let tenant = match self.cfg.tenant_path_segment {
                    Some(n) => Some(
                        path.split('/')
                            .nth(n - 1)
                            .ok_or_else(|| {
                                refused(format!("the SPIFFE ID has no path segment {n} (tenant)"))
                            })?
                            .to_owned(),
                    ),
                    None => self.cfg.tenant.clone(),
                };
                attributes.insert("trust_domain".to_owned(), domain.to_owned());
                (id.clone(), tenant)
            }
            (None, Some(pattern)) => {
                let cn = common_name(&leaf)
                    .ok_or_else(|| refused("the certificate's subject has no common name"))?;
                if !matches_pattern(pattern, &cn) {
                    return Err(refused("the subject is not accepted by this issuer"));
                }
                let tenant =
                    match self.cfg.tenant_subject_attribute.as_deref() {
                        Some(attr) => Some(subject_attribute(&leaf, attr).ok_or_else(|| {
                            refused(format!("the subject has no {attr} (tenant)"))
                        })?),
                        None => self.cfg.tenant.clone(),
                    };
                (cn, tenant)
            }
            (None, None) => return Err(refused("the issuer accepts no identity")),
        };
        let subject = crate::check::identifier("certificate identity", &subject)
            .map_err(|e| refused(e.message))?;
        let tenant = tenant
            .map(|t| crate::check::identifier("tenant", &t))
            .transpose()
            .map_err(|e| refused(e.message))?;
        Ok((
            Workload {
                id: format!("{}:{subject}", self.cfg.name),
                issuer: self.cfg.name.clone(),
                subject,
                tenant,
                attributes,
            },
            not_after_ms,
        ))
    }
}

/// What went wrong with a chain, in words for an investigator.
fn chain_error(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "the certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the certificate is not valid yet".into()
            }
            C::UnknownIssuer => "no CA of the trust bundle issued the certificate".into(),
            C::BadSignature => "a signature in the chain does not verify".into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the certificate is not for client authentication".into()
            }
            C::Revoked => "the certificate is revoked".into(),
            C::BadEncoding => "the certificate is malformed".into(),
            other => format!("the chain is refused: {other:?}"),
        },
        other => format!("the chain is refused: {other}"),
    }
}

/// The `spiffe://` URI SANs of a certificate.
fn spiffe_ids(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// A SPIFFE ID's trust domain and path (without its leading `/`), if it is
/// a valid one: `spiffe://<trust domain>/<segment>(/<segment>)*`, lowercase
/// domain, segments of `[A-Za-z0-9._-]` other than `.` and `..`.
fn parse_spiffe_id(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    if id.len() > 2048 {
        return None;
    }
    let (domain, path) = rest.split_once('/')?;
    if !crate::config::is_trust_domain(domain) || path.is_empty() {
        return None;
    }
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    path.split('/').all(segment_ok).then_some((domain, path))
}

/// An X.509-SVID leaf signs (digitalSignature) and signs no certificates.
fn check_svid_key_usage(leaf: &X509Certificate<'_>) -> Result<(), AuthError> {
    let ku = leaf
        .key_usage()
        .map_err(|_| refused("the key usage extension is malformed"))?
        .ok_or_else(|| refused("an X.509-SVID must state its key usage"))?;
    if !ku.value.digital_signature() {
        return Err(refused("the key usage lacks digitalSignature"));
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(refused(
            "a workload's certificate must not sign certificates",
        ));
    }
    Ok(())
}

fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?.to_owned();
    // two common names are ambiguous: refuse rather than pick one
    names.next().is_none().then_some(cn)
}

fn subject_attribute(cert: &X509Certificate<'_>, attr: &str) -> Option<String> {
    let s = cert.subject();
    let mut it: Box<dyn Iterator<Item = _>> = match attr {
        "O" => Box::new(s.iter_organization()),
        "OU" => Box::new(s.iter_organizational_unit()),
        _ => return None,
    };
    let v = it.next()?.as_str().ok()?.to_owned();
    it.next().is_none().then_some(v)
}

/// Does a common name match the pattern? `*` stands for exactly one DNS
/// label (letters, digits, `-`, `_`); everything else matches itself,
/// ignoring ASCII case.
fn matches_pattern(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    let (pl, nl): (Vec<&str>, Vec<&str>) = (p.split('.').collect(), n.split('.').collect());
    pl.len() == nl.len()
        && pl.iter().zip(&nl).all(|(p, n)| {
            if *p == "*" {
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            } else {
                p == n
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_strictly() {
        assert_eq!(
            parse_spiffe_id("spiffe://prod.example.org/ns/a/sa/b"),
            Some(("prod.example.org", "ns/a/sa/b"))
        );
        for bad in [
            "spiffe://prod.example.org",
            "spiffe://prod.example.org/",
            "spiffe://Prod.example.org/a",
            "spiffe://prod.example.org/a//b",
            "spiffe://prod.example.org/a/../b",
            "spiffe://prod.example.org/a/",
            "spiffe://user@prod.example.org/a",
            "spiffe://prod.example.org:443/a",
            "spiffe://prod.example.org/a?x",
            "https://prod.example.org/a",
        ] {
            assert_eq!(parse_spiffe_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn patterns_match_one_label() {
        assert!(matches_pattern(
            "*.agents.example.org",
            "billing.agents.example.org"
        ));
        assert!(matches_pattern(
            "*.agents.example.org",
            "Billing.Agents.example.org"
        ));
        assert!(!matches_pattern(
            "*.agents.example.org",
            "a.b.agents.example.org"
        ));
        assert!(!matches_pattern(
            "*.agents.example.org",
            "agents.example.org"
        ));
        assert!(!matches_pattern(
            "*.agents.example.org",
            "x.agents.example.org.evil"
        ));
        assert!(matches_pattern(
            "agent-1.example.org",
            "agent-1.example.org"
        ));
        assert!(!matches_pattern(
            "agent-1.example.org",
            "agent-2.example.org"
        ));
    }
}
