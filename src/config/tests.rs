use super::*;

const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:7711"
[store]
path = "leasehold.redb"
key_file = "store.key"
[auth]
[audit]
checkpoint_key_file = "checkpoint.pk8"
[policy]
dir = "policies"
[providers.token]
type = "token"
issuer = "https://leasehold.test"
audience = "svc"
signing_key_file = "token.pk8"
[providers.token.roles.demo]
scopes = ["demo:read"]
max_ttl_seconds = 600
"#;

fn err(text: &str) -> String {
    Config::from_toml(text, "test.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn minimal_parses() {
    let c = Config::from_toml(MINIMAL, "test.toml").unwrap();
    assert_eq!(c.limits.max_lease_ttl_seconds, 3600);
    assert_eq!(c.providers["token"].kind(), "token");
}

#[test]
fn unknown_fields_are_rejected_and_named() {
    let e = err(&MINIMAL.replace("[auth]", "[auth]\nbogus = 1"));
    assert!(e.contains("bogus"), "{e}");
    let e = err(&MINIMAL.replace("max_ttl_seconds = 600", "max_ttl_seconds = 600\nttl = 5"));
    assert!(e.contains("ttl"), "{e}");
    let e = err(&MINIMAL.replace("type = \"token\"", "type = \"token\"\nextra = true"));
    assert!(e.contains("extra"), "{e}");
    let e = err(&MINIMAL.replace("type = \"token\"", "type = \"nope\""));
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn wrong_types_are_named() {
    let e = err(&MINIMAL.replace("max_ttl_seconds = 600", "max_ttl_seconds = \"600\""));
    assert!(e.contains("max_ttl_seconds"), "{e}");
}

#[test]
fn semantic_errors_name_the_field() {
    let e = err(&MINIMAL.replace("127.0.0.1:7711", "0.0.0.0:7711"));
    assert!(e.contains("server.listen"), "{e}");
    let e = err(&MINIMAL.replace("max_ttl_seconds = 600", "max_ttl_seconds = 0"));
    assert!(
        e.contains("providers.token.roles.demo.max_ttl_seconds"),
        "{e}"
    );
    let e = err(&MINIMAL.replace("key_file = \"store.key\"", ""));
    assert!(e.contains("store.key_file"), "{e}");
    let e = err(&MINIMAL.replace(
            "[auth]",
            "[auth]\n[[auth.workload_issuers]]\nname=\"k\"\nissuer=\"i\"\naudiences=[\"a\"]\nalgorithms=[\"HS256\"]\njwks_file=\"j\"",
        ));
    assert!(e.contains("auth.workload_issuers[0].algorithms"), "{e}");
    let e = err(&MINIMAL.replace(
        "[auth]",
        "[auth]\n[[auth.operators]]\nname=\"a\"\nroles=[\"admin\"]\ntoken_sha256=\"xyz\"",
    ));
    assert!(e.contains("token_sha256"), "{e}");
}

#[test]
fn written_config_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = crate::dev::prepare(
        dir.path(),
        "127.0.0.1:7711".parse().unwrap(),
        crate::clock::Timestamp::from_unix_millis(1_800_000_000_000),
    )
    .unwrap();
    let text = cfg.to_toml().unwrap();
    let back = Config::from_toml(&text, "written").unwrap();
    assert_eq!(back.to_toml().unwrap(), text);
    assert_eq!(back.providers["token"].kind(), "token");
    assert_eq!(back.auth.operators.len(), 4);
}

#[test]
fn tls_allows_any_address() {
    let text = MINIMAL.replace("127.0.0.1:7711", "0.0.0.0:7711").replace(
        "[store]",
        "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[store]",
    );
    Config::from_toml(&text, "t").unwrap();
}

#[test]
fn relative_paths_resolve_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lh.toml");
    std::fs::write(&p, MINIMAL).unwrap();
    let c = Config::load(&p).unwrap();
    assert_eq!(c.store.path, dir.path().join("leasehold.redb"));
    let t = c.providers["token"]
        .get::<leasehold_provider_token::TokenProviderConfig>()
        .expect("a token provider");
    assert_eq!(t.signing_key_file, dir.path().join("token.pk8"));
}

#[test]
fn the_checkpoint_default_is_the_stores() {
    assert_eq!(
        defaults::checkpoint_mib() << 20,
        crate::store::StoreOptions::DEFAULT_CHECKPOINT_BYTES
    );
}
