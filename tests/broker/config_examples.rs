//! Every example config (`config/`, and the one the Kubernetes manifests
//! mount from `deploy/`) parses and validates, so the documentation cannot
//! drift from the code; `leasehold config validate` accepts a real config and
//! names the field of a broken one.

use std::path::Path;

use leasehold::config::Config;

fn tomls_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            tomls_under(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_config_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    tomls_under(&root.join("config"), &mut files);
    tomls_under(&root.join("deploy"), &mut files);
    for path in &files {
        // the egress proxy's example is the proxy's configuration
        if path.file_name().is_some_and(|n| n == "proxy.example.toml") {
            let p = leasehold_proxy::ProxyConfig::load(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!p.routes.is_empty());
            continue;
        }
        let cfg = Config::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    assert!(
        files.len() >= 3,
        "expected example configs, found {files:?}"
    );
}

/// A commented `[providers.NAME]` block of the example config, uncommented,
/// as the provider's own table (without `type`, which is checked).
fn example_block(name: &str, kind: &str) -> toml::Table {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config/leasehold.example.toml")).unwrap();
    let start = text.find(&format!("# [providers.{name}]")).unwrap();
    let block: String = text[start..]
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter(|l| !l.starts_with("# #") && l.len() > 2)
        .map(|l| format!("{}\n", &l[2..]))
        .collect();
    let table: toml::Table = toml::from_str(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
    let mut t = table["providers"][name].as_table().unwrap().clone();
    assert_eq!(t.remove("type").unwrap().as_str(), Some(kind));
    t
}

/// The example's Vault, AWS and Azure blocks parse and validate: they cannot rot.
#[test]
fn the_example_provider_blocks_are_valid() {
    let vault: leasehold_provider_vault::VaultConfig =
        example_block("vault", "vault").try_into().unwrap();
    vault.validate(3600).unwrap();
    assert_eq!(vault.roles.len(), 3);
    assert_eq!(vault.auth.method(), "approle");
    let aws: leasehold_provider_aws_sts::AwsStsConfig =
        example_block("aws", "aws-sts").try_into().unwrap();
    aws.validate(3600).unwrap();
    assert_eq!(aws.roles["reports-reader"].scopes.len(), 2);
    let azure: leasehold_provider_azure::AzureConfig =
        example_block("azure", "azure").try_into().unwrap();
    azure.validate(3600).unwrap();
    assert_eq!(azure.roles.len(), 3);
    assert_eq!(azure.workload_principals.len(), 1);
    let plugin: leasehold_plugin::PluginConfig =
        example_block("mariadb", "plugin").try_into().unwrap();
    use leasehold_provider::ProviderSettings as _;
    let limits = leasehold_provider::BrokerLimits {
        max_lease_ttl_seconds: 3600,
        provider_timeout_seconds: 10,
    };
    plugin.validate(&limits).unwrap();
    // the plugin's own configuration is the MariaDB provider's, valid too
    let mysql: leasehold_provider_mysql::MysqlConfig = plugin.config.clone().try_into().unwrap();
    mysql.validate(3600).unwrap();
    assert_eq!(plugin.roles(), vec![("reader", 900)]);
}

fn validate_cli(file: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["config", "validate"])
        .arg(file)
        .output()
        .unwrap()
}

/// `config validate` refuses `file`, naming `field`; `what` says which case.
fn refused_naming(file: &Path, field: &str, what: &str) {
    let out = validate_cli(file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} was accepted");
    assert!(err.contains(field), "{what}: {err}");
}

#[test]
fn config_validate_checks_files_and_names_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) =
        crate::harness::child_config(dir.path(), "127.0.0.1:7711".parse().unwrap(), |_| {});
    let out = validate_cli(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    let text = std::fs::read_to_string(&path).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replace("max_ttl_seconds = 900", "max_ttl_seconds = \"900\""),
    )
    .unwrap();
    refused_naming(&bad, "max_ttl_seconds", "a string TTL");

    std::fs::write(&bad, text.replace("token-signing.pk8", "missing.pk8")).unwrap();
    refused_naming(
        &bad,
        "providers.token.signing_key_file",
        "a missing key file",
    );

    // a wrong store key is caught by `serve` before it listens
    std::fs::write(dir.path().join("store.key"), "not a key").unwrap();
    refused_naming(&path, "store.key_file", "a malformed store key");
}

#[test]
fn serve_refuses_a_store_with_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let addr = crate::harness::free_port();
    let (path, _) = crate::harness::child_config(dir.path(), addr, |_| {});
    // create the store with the first key
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let key = leasehold::store::StoreKey::from_file(&dir.path().join("store.key")).unwrap();
        drop(
            leasehold::store::Store::open(
                &leasehold::store::StoreOptions::new(dir.path().join("leasehold.redb")),
                &key,
            )
            .unwrap(),
        );
    });
    std::fs::remove_file(dir.path().join("store.key")).unwrap();
    leasehold::store::StoreKey::generate()
        .unwrap()
        .write_new_file(&dir.path().join("store.key"))
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match"), "{err}");
    // missing key: also a clear error
    std::fs::remove_file(dir.path().join("store.key")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.key"));
}

/// Wrong or missing tenant and client settings of an Azure provider are
/// caught by `config validate`, naming the field, before anything starts.
#[test]
fn config_validate_names_a_wrong_azure_setting() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("azure-secret");
    std::fs::write(&secret, "s3cr3t").unwrap();
    let mut block = example_block("azure", "azure");
    let auth = block["auth"].as_table_mut().unwrap();
    auth.insert(
        "client_secret_file".into(),
        toml::Value::String(secret.display().to_string()),
    );
    let azure: leasehold_provider_azure::AzureConfig = block.try_into().unwrap();
    let (path, _) =
        crate::harness::child_config(dir.path(), "127.0.0.1:7711".parse().unwrap(), |c| {
            c.providers.insert(
                "azure".into(),
                leasehold::config::ProviderConfig::new(azure),
            );
        });
    let out = validate_cli(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let client = "2f1a9c3e-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
    assert!(text.contains(tenant) && text.contains(client), "{text}");
    let bad = dir.path().join("bad.toml");
    for (from, to, field) in [
        (
            tenant,
            "contoso.onmicrosoft.com",
            "providers.azure.tenant_id",
        ),
        (client, "my-app", "providers.azure.auth.client_id"),
        (
            &secret.display().to_string()[..],
            "/nonexistent/azure-secret",
            "providers.azure.auth.client_secret_file",
        ),
        (
            "https://storage.azure.com/.default",
            "https://graph.microsoft.com/.default",
            "providers.azure.roles.blob-token.resource_scope",
        ),
    ] {
        std::fs::write(&bad, text.replace(from, to)).unwrap();
        refused_naming(&bad, field, &format!("{from} -> {to}"));
    }
    // a missing tenant is named too
    let no_tenant: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("tenant_id"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&bad, no_tenant).unwrap();
    refused_naming(&bad, "tenant_id", "a missing tenant");
}
