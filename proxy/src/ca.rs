//! The local CA for `CONNECT` interception: generated once into `ca_dir`
//! (the key readable by the proxy's user only), and a certificate per
//! routed host, minted on first use and kept in memory.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    pub cert_path: PathBuf,
    hosts: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// Leaf certificates live this long (the proxy mints again after a restart).
const LEAF_DAYS: i64 = 7;

impl LocalCa {
    /// Load `ca.pem` and `ca-key.pem` from `dir`, or create them.
    pub fn open(dir: &Path) -> Result<Self, String> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let ctx = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
            format!("ca_dir: {what} {}: {e}", p.display())
        };
        if !cert_path.exists() && !key_path.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| ctx("creating", dir, &e))?;
            let key = KeyPair::generate().map_err(|e| ctx("generating a key for", dir, &e))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| ctx("signing", &cert_path, &e))?;
            write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(|e| ctx("writing", &key_path, &e))?;
            write_new(&cert_path, cert.pem().as_bytes(), 0o644)
                .map_err(|e| ctx("writing", &cert_path, &e))?;
            tracing::info!(ca = %cert_path.display(), "created the local CA for CONNECT interception; give ca.pem to assistants (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS)");
        }
        let meta = std::fs::metadata(&key_path).map_err(|e| ctx("reading", &key_path, &e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "ca_dir: {} is readable by others (mode {:o}); chmod 600 it",
                key_path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        let key_pem =
            std::fs::read_to_string(&key_path).map_err(|e| ctx("reading", &key_path, &e))?;
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(|e| ctx("reading", &cert_path, &e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| ctx("parsing", &key_path, &e))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| ctx("parsing", &cert_path, &e))?;
        use rustls::pki_types::pem::PemObject as _;
        let ca_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| ctx("parsing", &cert_path, &e))?;
        Ok(Self {
            issuer,
            ca_der,
            cert_path,
            hosts: Mutex::new(HashMap::new()),
        })
    }

    /// The TLS server configuration that speaks as `host` to the assistant.
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut hosts = self
            .hosts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = hosts.get(host) {
            return Ok(c.clone());
        }
        let mut params =
            CertificateParams::new(vec![host.to_owned()]).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::from(crate::now());
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(LEAF_DAYS);
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        if hosts.len() > 4096 {
            hosts.clear();
        }
        hosts.insert(host.to_owned(), cfg.clone());
        Ok(cfg)
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "leasehold proxy local CA");
    dn.push(DnType::OrganizationName, "leasehold");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::from(crate::now());
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
