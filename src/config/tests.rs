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
    assert_eq!(back.auth.operators.len(), 5);
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

#[test]
fn x509_issuers_are_checked() {
    let tls = "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[store]";
    let with = |issuer: &str| {
        MINIMAL.replace("[store]", tls).replace(
            "[auth]",
            &format!("[auth]\n[[auth.workload_issuers]]\n{issuer}"),
        )
    };
    let ok = with(
        "kind = \"x509\"\nname = \"spire\"\ntrust_bundle_file = \"b.pem\"\ntrust_domain = \"prod.example.org\"\ntenant_path_segment = 2",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lh.toml");
    std::fs::write(&file, &ok).unwrap();
    let c = Config::load(&file).unwrap();
    let i = &c.auth.workload_issuers[0];
    assert_eq!(i.kind, IssuerKind::X509);
    assert_eq!(i.trust_bundle_file, Some(dir.path().join("b.pem")));
    Config::from_toml(
        &with("kind = \"x509\"\nname = \"corp\"\ntrust_bundle_file = \"b.pem\"\nsubject_pattern = \"*.agents.example.org\"\ntenant_subject_attribute = \"OU\""),
        "t",
    )
    .unwrap();
    // each mistake names its field
    for (issuer, field) in [
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_domain = \"td\"",
            "trust_bundle_file",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"",
            "trust_domain",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\ntrust_domain = \"td\"\nsubject_pattern = \"*.x.org\"",
            "trust_domain",
        ),
        // no wildcard trust
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\ntrust_domain = \"*.example.org\"",
            "trust_domain",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\nsubject_pattern = \"*\"",
            "subject_pattern",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\nsubject_pattern = \"*.*.org\"",
            "subject_pattern",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\nsubject_pattern = \"a*.org\"",
            "subject_pattern",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\ntrust_domain = \"Prod\"",
            "trust_domain",
        ),
        // the other kind's fields
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\ntrust_domain = \"td\"\njwks_file = \"j\"",
            "jwks_file",
        ),
        (
            "name = \"j\"\nissuer = \"i\"\naudiences = [\"a\"]\nalgorithms = [\"EdDSA\"]\njwks_file = \"j\"\ntrust_domain = \"td\"",
            "trust_domain",
        ),
        // tenant sources
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\ntrust_domain = \"td\"\ntenant_path_segment = 0",
            "tenant_path_segment",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\ntrust_domain = \"td\"\ntenant_subject_attribute = \"O\"",
            "tenant_subject_attribute",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\nsubject_pattern = \"*.x.org\"\ntenant_subject_attribute = \"CN\"",
            "tenant_subject_attribute",
        ),
        (
            "kind = \"x509\"\nname = \"s\"\ntrust_bundle_file = \"b\"\ntrust_domain = \"td\"\ntenant = \"t\"\ntenant_path_segment = 1",
            "tenant",
        ),
        ("kind = \"pgp\"\nname = \"s\"", "kind"),
    ] {
        let e = err(&with(issuer));
        assert!(e.contains(field), "{issuer}: {e}");
    }
    // certificates arrive only over TLS
    let e = err(&ok.replace(tls, "[store]"));
    assert!(e.contains("needs [server.tls]"), "{e}");
}

#[test]
fn dpop_window_and_public_url_are_checked() {
    let e = err(&MINIMAL.replace("[auth]", "[auth]\ndpop_max_age_seconds = 0"));
    assert!(e.contains("auth.dpop_max_age_seconds"), "{e}");
    let e = err(&MINIMAL.replace("[auth]", "[auth]\ndpop_leeway_seconds = 3600"));
    assert!(e.contains("auth.dpop_leeway_seconds"), "{e}");
    let e = err(&MINIMAL.replace("[store]", "public_url = \"broker.example\"\n[store]"));
    assert!(e.contains("server.public_url"), "{e}");
    Config::from_toml(
        &MINIMAL.replace(
            "[store]",
            "public_url = \"https://broker.example\"\n[store]",
        ),
        "t",
    )
    .unwrap();
}
