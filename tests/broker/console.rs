//! The web console over plain HTTP (its browser tests are in
//! integration/console): sign-in and its cookie, the headers every page
//! carries, the vendored script pinned by digest, and the prompt's text on
//! an approval when the broker keeps it.

use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::json;

use crate::harness::{Harness, Options};

/// htmx 2.0.11 (npm `htmx.org`), as vendored.
const HTMX_SHA256: &str = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `name=value` of a `Set-Cookie` for `name`, and the whole header.
fn cookie(resp: &reqwest::Response, name: &str) -> (String, String) {
    let header = resp
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie"));
    (header.split(';').next().unwrap().to_owned(), header)
}

fn field(html: &str, name: &str) -> String {
    let key = format!("name=\"{name}\" value=\"");
    let at = html.find(&key).unwrap_or_else(|| panic!("no {name} field")) + key.len();
    html[at..].split('"').next().unwrap().to_owned()
}

/// Sign in as `token`; the session cookie (`lh_console=...`).
async fn sign_in(h: &Harness, http: &reqwest::Client, token: &str) -> String {
    let form = http.get(h.url("/console/login")).send().await.unwrap();
    let (login_cookie, _) = cookie(&form, "lh_console_login");
    let csrf = field(&form.text().await.unwrap(), "csrf");
    let resp = http
        .post(h.url("/console/login"))
        .header("cookie", login_cookie)
        .form(&[("csrf", csrf.as_str()), ("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (session, header) = cookie(&resp, "lh_console");
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=28800",
    ] {
        assert!(header.contains(flag), "{header}");
    }
    assert!(
        !header.contains("Secure"),
        "plain HTTP: no Secure flag, {header}"
    );
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sign_in_headers_assets_and_the_prompt_an_approver_reads() {
    let h = Harness::start(Options {
        tweak: Box::new(|c| c.limits.store_prompt_text = true),
        ..Options::default()
    })
    .await;
    let http = no_redirects();
    // signed out: to the sign-in page, and nothing else
    let r = http.get(h.url("/console/approvals")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/console/login");
    // a forged sign-in form is refused before the token is looked at
    let r = http
        .post(h.url("/console/login"))
        .form(&[("csrf", "x"), ("token", h.tokens.approver.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(cookie_absent(&r, "lh_console"));

    // a pending approval whose task kept its prompt
    let (s, v) = h
        .post(
            &h.tokens.a,
            "/v1/tasks",
            json!({"purpose": "q3", "on_behalf_of": "alice@example.com", "prompt": "Summarise <b>Q3</b> & mail it", "tools": ["demo.write"], "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let task = v["task_id"].as_str().unwrap().to_owned();
    let (s, v) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/calls"),
            json!({"tool": "demo.write", "action": "update", "resource": "ticket:9"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    let session = sign_in(&h, &http, &h.tokens.approver).await;
    let r = http
        .get(h.url("/console/approvals"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let headers = r.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["cache-control"], "no-store");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("Summarise &lt;b&gt;Q3&lt;/b&gt; &amp; mail it"),
        "the prompt's text, escaped"
    );
    assert!(!body.contains("<b>Q3</b>"));
    // no inline script anywhere (the CSP would refuse it)
    assert!(!body.contains("<script>") && !body.contains("onclick"));

    // the vendored script is the pinned one
    let js = http
        .get(h.url("/console/assets/htmx.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.headers()["content-type"], "text/javascript");
    let bytes = js.bytes().await.unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    assert_eq!(leasehold::hex::encode(digest.as_ref()), HTMX_SHA256);

    // sign-out ends the session server-side
    let csrf = field(&body, "csrf");
    let r = http
        .post(h.url("/console/logout"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = http
        .get(h.url("/console/approvals"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "the old cookie is dead");

    // a restart signs everyone out (sessions live in this process only)
    let session = sign_in(&h, &http, &h.tokens.responder).await;
    let mut h = h;
    h.restart().await;
    let r = http
        .get(h.url("/console/leases"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
}

fn cookie_absent(resp: &reqwest::Response, name: &str) -> bool {
    !resp.headers().get_all(SET_COOKIE).iter().any(|v| {
        v.to_str().unwrap().starts_with(&format!("{name}="))
            && !v.to_str().unwrap().contains("Max-Age=0")
    })
}

/// The console in headless Chromium (Debian's `chromium` and
/// `chromium-driver`, which integration/test.sh installs), driven by
/// Selenium over WebDriver: `integration/console/`. Screenshots land in
/// `<target>/tmp/console-screenshots/<scenario>/`.
#[test]
fn console_in_a_real_browser() {
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    crate::python_sdk::pytest_in(
        "integration/console",
        &["test_console.py"],
        &[("LEASEHOLD_CONSOLE_SHOTS", &shots)],
    );
    eprintln!("console screenshots: {}", shots.display());
}
