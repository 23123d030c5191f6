//! Table-driven policy tests: one `check` helper, one row per case, against
//! the example set in `config/policies` plus a few rules of the tests' own.

use std::collections::{HashMap, HashSet};

use std::str::FromStr as _;

use cedar_policy::Policy;

use super::*;

const EXTRA: &str = r#"
@id("no-reads-for-mallory")
@reason("mallory may not have documents read for her")
forbid (principal, action == Leasehold::Action::"Call", resource == Leasehold::Tool::"demo.read")
when { context.task.user == "mallory@example.com" };

@id("tenant-b-secret-rule")
@tenant("other")
forbid (principal, action == Leasehold::Action::"Call", resource == Leasehold::Tool::"demo.read")
when { context.target == "vault:crown-jewels" };

@id("short-write-leases")
@max_ttl("120")
permit (principal in Leasehold::Group::"assistants", action == Leasehold::Action::"Lease", resource)
when { context.tool == "demo.write" && resource.provider == "token" };
"#;

fn folder(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.path().join("extra.cedar"), extra).unwrap();
    dir
}

fn roles() -> Vec<RoleEntity> {
    vec![RoleEntity {
        provider: "token".into(),
        role: "demo".into(),
        max_ttl: 900,
    }]
}

fn engine() -> (tempfile::TempDir, PolicyEngine) {
    let dir = folder(EXTRA);
    let e = PolicyEngine::load(dir.path(), roles()).unwrap();
    (dir, e)
}

fn who(id: &str) -> Principal {
    Principal {
        id: id.into(),
        issuer: "dev".into(),
        tenant: "dev".into(),
        attributes: BTreeMap::new(),
    }
}

fn task(user: &str, active: u64) -> TaskFacts {
    TaskFacts {
        id: "task_1".into(),
        purpose: "p".into(),
        declared_tools: vec!["demo.read".into(), "demo.write".into(), "demo.admin".into()],
        prompt_sha256: "00".repeat(32),
        user: user.into(),
        active_leases: active,
        lease_count: active,
        remaining_seconds: 600,
    }
}

const NOW: Now = Now {
    unix: 1_800_000_000,
};

struct Case {
    name: &'static str,
    workload: &'static str,
    user: &'static str,
    active: u64,
    tool: &'static str,
    target: &'static str,
    break_glass: bool,
    credential: Option<(&'static str, u64)>,
    expect: Outcome,
    /// a determining policy, a reason fragment, or a max TTL to expect
    policy: Option<&'static str>,
    reason: Option<&'static str>,
    max_ttl: Option<u64>,
}

const BASE: Case = Case {
    name: "",
    workload: "dev:assistant-a",
    user: "alice@example.com",
    active: 0,
    tool: "demo.read",
    target: "doc:1",
    break_glass: false,
    credential: None,
    expect: Outcome::Allow,
    policy: None,
    reason: None,
    max_ttl: None,
};

fn check(e: &PolicyEngine, c: &Case) {
    let facts = CallFacts {
        tool: c.tool.into(),
        action: "read".into(),
        target: c.target.into(),
        arguments_sha256: "ab".repeat(32),
        break_glass: c.break_glass.then(|| "prod is down".to_owned()),
        credential: c.credential.map(|(role, ttl)| LeaseFacts {
            provider: "token".into(),
            role: role.into(),
            scope: vec![],
            requested_ttl: ttl,
            binding: None,
        }),
    };
    let d = e.call(
        &who(c.workload),
        &task(c.user, c.active),
        &facts,
        c.active,
        NOW,
    );
    assert_eq!(d.outcome, c.expect, "{}: {d:?}", c.name);
    if let Some(p) = c.policy {
        assert!(
            d.policies.iter().any(|x| x == p),
            "{}: expected policy {p} in {:?}",
            c.name,
            d.policies
        );
    }
    if let Some(r) = c.reason {
        assert!(
            d.reasons.iter().any(|x| x.contains(r)),
            "{}: expected reason `{r}` in {:?}",
            c.name,
            d.reasons
        );
    }
    assert_eq!(d.obligations.max_ttl, c.max_ttl, "{}: max_ttl", c.name);
}

#[test]
fn decisions() {
    let (_dir, e) = engine();
    let cases = [
        Case {
            name: "read is allowed",
            policy: Some("read-demo"),
            ..BASE
        },
        Case {
            name: "write needs approval",
            tool: "demo.write",
            expect: Outcome::ApprovalRequired,
            policy: Some("write-demo-with-approval"),
            ..BASE
        },
        Case {
            name: "admin only through break-glass",
            tool: "demo.admin",
            expect: Outcome::Deny,
            reason: Some("only through break-glass"),
            ..BASE
        },
        Case {
            name: "break-glass for the on-call assistant",
            tool: "demo.admin",
            break_glass: true,
            policy: Some("break-glass-on-call"),
            ..BASE
        },
        Case {
            name: "break-glass refused without a BreakGlass permit",
            workload: "dev:assistant-b",
            tool: "demo.admin",
            break_glass: true,
            expect: Outcome::Deny,
            reason: Some("break-glass is not permitted"),
            ..BASE
        },
        Case {
            name: "break-glass skips the approval",
            tool: "demo.write",
            break_glass: true,
            ..BASE
        },
        Case {
            name: "undeclared tool",
            tool: "demo.delete",
            expect: Outcome::Deny,
            reason: Some("did not declare"),
            ..BASE
        },
        Case {
            name: "unknown workload has no grants",
            workload: "dev:stranger",
            expect: Outcome::Deny,
            reason: Some("no policy permits"),
            ..BASE
        },
        Case {
            name: "forbid overrides permit",
            user: "mallory@example.com",
            expect: Outcome::Deny,
            policy: Some("no-reads-for-mallory"),
            reason: Some("mallory may not"),
            ..BASE
        },
        Case {
            name: "read with a credential, capped by @max_ttl",
            credential: Some(("demo", 3000)),
            policy: Some("demo-token-leases"),
            max_ttl: Some(900),
            ..BASE
        },
        Case {
            name: "the smallest @max_ttl wins",
            tool: "demo.write",
            break_glass: true,
            credential: Some(("demo", 3000)),
            max_ttl: Some(120),
            ..BASE
        },
        Case {
            name: "unknown provider role",
            credential: Some(("root", 60)),
            expect: Outcome::Deny,
            reason: Some("no provider role"),
            ..BASE
        },
        Case {
            name: "quota: too many active leases",
            active: 20,
            credential: Some(("demo", 60)),
            expect: Outcome::Deny,
            reason: Some("at most 20 active leases"),
            ..BASE
        },
        Case {
            name: "quota does not limit calls without credentials",
            active: 20,
            ..BASE
        },
    ];
    for c in &cases {
        check(&e, c);
    }
}

#[test]
fn other_tenants_policies_are_counted_not_named() {
    let (_dir, e) = engine();
    let facts = CallFacts {
        tool: "demo.read".into(),
        target: "vault:crown-jewels".into(),
        ..CallFacts::default()
    };
    let d = e.call(
        &who("dev:assistant-a"),
        &task("alice@example.com", 0),
        &facts,
        0,
        NOW,
    );
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.policies, ["tenant-b-secret-rule"]);
    let l = e.current();
    assert_eq!(
        d.visible_policies(&l, "dev"),
        ["(a policy of another tenant)"]
    );
    assert_eq!(d.visible_policies(&l, "other"), ["tenant-b-secret-rule"]);
}

#[test]
fn opening_tasks_and_direct_leases_are_decided() {
    let (_dir, e) = engine();
    let t = task("alice@example.com", 0);
    assert_eq!(
        e.open_task(&who("dev:assistant-a"), &t, 600, NOW).outcome,
        Outcome::Allow
    );
    let long = e.open_task(&who("dev:assistant-a"), &t, 7200, NOW);
    assert_eq!(long.outcome, Outcome::Deny);
    assert_eq!(
        e.open_task(&who("dev:stranger"), &t, 600, NOW).outcome,
        Outcome::Deny
    );
    let lease = LeaseFacts {
        provider: "token".into(),
        role: "demo".into(),
        scope: vec![],
        requested_ttl: 60,
        binding: None,
    };
    let d = e.lease(&who("dev:assistant-b"), &t, &lease, 0, NOW);
    assert_eq!(
        (d.outcome, d.obligations.max_ttl),
        (Outcome::Allow, Some(900))
    );
    assert_eq!(
        e.lease(&who("dev:assistant-b"), &task("u", 25), &lease, 0, NOW)
            .outcome,
        Outcome::Deny
    );
}

#[test]
fn bad_policy_sets_are_refused_with_file_and_line() {
    let syntax = folder("permit (principal, action, resource\nwhen { true };");
    let err = PolicyEngine::load(syntax.path(), roles()).unwrap_err();
    assert!(err.problems[0].starts_with("extra.cedar:"), "{err}");

    let schema = folder(
        "\n\npermit (principal, action == Leasehold::Action::\"Call\", resource)\nwhen { context.nonexistent == 1 };",
    );
    let err = PolicyEngine::load(schema.path(), roles()).unwrap_err();
    assert!(
        err.problems.iter().any(|p| p.starts_with("extra.cedar:4:")),
        "{err}"
    );

    let ann = folder("@max_ttl(\"soon\")\npermit (principal, action, resource);");
    let err = PolicyEngine::load(ann.path(), roles()).unwrap_err();
    assert!(err.to_string().contains("@max_ttl"), "{err}");

    let dup = folder("@id(\"read-demo\")\npermit (principal, action, resource);");
    assert!(
        PolicyEngine::load(dup.path(), roles())
            .unwrap_err()
            .to_string()
            .contains("used twice")
    );
}

#[test]
fn a_bad_reload_keeps_the_old_set() {
    let dir = folder(EXTRA);
    let e = PolicyEngine::load(dir.path(), roles()).unwrap();
    let before = e.current().version.clone();
    std::fs::write(
        dir.path().join("extra.cedar"),
        "permit (principal, action, resource",
    )
    .unwrap();
    let err = e.reload().unwrap_err();
    assert!(err.problems[0].starts_with("extra.cedar:"), "{err}");
    assert_eq!(e.current().version, before, "the old set stays in force");
    let d = e.call(
        &who("dev:assistant-a"),
        &task("mallory@example.com", 0),
        &CallFacts {
            tool: "demo.read".into(),
            ..CallFacts::default()
        },
        0,
        NOW,
    );
    assert_eq!(d.outcome, Outcome::Deny, "the old forbid still applies");
    // a good reload swaps in the new set
    std::fs::write(dir.path().join("extra.cedar"), "// nothing extra\n").unwrap();
    let next = e.reload().unwrap();
    assert_ne!(next.version, before);
    let d = e.call(
        &who("dev:assistant-a"),
        &task("mallory@example.com", 0),
        &CallFacts {
            tool: "demo.read".into(),
            ..CallFacts::default()
        },
        0,
        NOW,
    );
    assert_eq!(d.outcome, Outcome::Allow);
}

#[test]
fn slicing_decides_exactly_as_the_whole_set() {
    let (_dir, sliced) = engine();
    let (_dir2, mut whole) = engine();
    whole.slicing = false;
    let tools = ["demo.read", "demo.write", "demo.admin"];
    let mut compared = 0;
    for w in ["dev:assistant-a", "dev:assistant-b", "dev:stranger"] {
        for user in ["alice@example.com", "mallory@example.com"] {
            for tool in tools {
                for bg in [false, true] {
                    for cred in [None, Some(("demo", 60)), Some(("demo", 5000))] {
                        for target in ["doc:1", "vault:crown-jewels"] {
                            for active in [0, 25] {
                                let facts = CallFacts {
                                    tool: tool.into(),
                                    target: target.into(),
                                    break_glass: bg.then(|| "why".to_owned()),
                                    credential: cred.map(|(r, t)| LeaseFacts {
                                        provider: "token".into(),
                                        role: r.into(),
                                        scope: vec![],
                                        requested_ttl: t,
                                        binding: None,
                                    }),
                                    ..CallFacts::default()
                                };
                                let t = task(user, active);
                                let a = sliced.call(&who(w), &t, &facts, active, NOW);
                                let b = whole.call(&who(w), &t, &facts, active, NOW);
                                assert_eq!(
                                    (a.outcome, &a.policies, &a.reasons, &a.obligations),
                                    (b.outcome, &b.policies, &b.reasons, &b.obligations),
                                    "{w} {user} {tool} bg={bg} {cred:?} {target}"
                                );
                                compared += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(compared, 3 * 2 * 3 * 2 * 3 * 2 * 2);
}

#[test]
fn time_is_a_fact_policies_can_use() {
    let dir = folder(
        "@id(\"no-sunday-tasks\")\n@reason(\"no tasks on Sundays\")\nforbid (principal, action == Leasehold::Action::\"OpenTask\", resource)\nwhen { context.time.weekday == 7 && context.time.hour >= 12 };",
    );
    let e = PolicyEngine::load(dir.path(), roles()).unwrap();
    let t = task("alice@example.com", 0);
    // 1970-01-04 was a Sunday; 13:00 UTC
    let sunday = Now {
        unix: 3 * 86_400 + 13 * 3600,
    };
    let d = e.open_task(&who("dev:assistant-a"), &t, 600, sunday);
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.reasons, ["no tasks on Sundays"]);
    let sunday_morning = Now {
        unix: 3 * 86_400 + 9 * 3600,
    };
    assert_eq!(
        e.open_task(&who("dev:assistant-a"), &t, 600, sunday_morning)
            .outcome,
        Outcome::Allow
    );
    let monday = Now {
        unix: 4 * 86_400 + 13 * 3600,
    };
    assert_eq!(
        e.open_task(&who("dev:assistant-a"), &t, 600, monday)
            .outcome,
        Outcome::Allow
    );
}

fn reads_of(policy: &str) -> Reads {
    let p = Policy::from_str(policy).unwrap();
    Reads::of([&p])
}

fn fields(top: &[(&str, Option<&[&str]>)]) -> Reads {
    Reads {
        all: false,
        attrs: top
            .iter()
            .map(|(k, f)| {
                let f = f.map(|f| f.iter().map(|s| (*s).to_owned()).collect());
                ((*k).to_owned(), f)
            })
            .collect(),
    }
}

#[test]
fn a_decision_builds_every_context_attribute_a_policy_reads() {
    let rows: [(&str, Reads); 10] = [
        (
            "context.requested_ttl <= 3600",
            fields(&[("requested_ttl", None)]),
        ),
        (
            "context.task.active_leases >= 20 && context.time.hour < 9",
            fields(&[
                ("task", Some(&["active_leases"])),
                ("time", Some(&["hour"])),
            ]),
        ),
        (
            r#"context["task"]["user"] == "a" && context.task.declared_tools.contains("x")"#,
            fields(&[("task", Some(&["user", "declared_tools"]))]),
        ),
        // `has` reads presence: the attribute must be there if it exists
        (
            "context.task has user && context has risk",
            fields(&[("task", Some(&["user"])), ("risk", None)]),
        ),
        // a record compared whole is built whole, whatever else is read
        (
            "context.task.user == \"a\" && context.task == context.task",
            fields(&[("task", None)]),
        ),
        (
            "context has task && context.task.user == \"a\"",
            fields(&[("task", None)]),
        ),
        // the context used whole: everything
        ("context == context", Reads::everything()),
        (
            "{\"r\": context}.r.risk > 1",
            Reads {
                all: true,
                attrs: HashMap::new(),
            },
        ),
        // an entity attribute named like the context is not the context
        (
            "principal has context && resource.provider == \"token\"",
            fields(&[]),
        ),
        ("true", fields(&[])),
    ];
    for (when, expected) in rows {
        let policy = format!("permit (principal, action, resource) when {{ {when} }};");
        let got = reads_of(&policy);
        // a whole-context read makes the rest moot
        let got = if got.all { Reads::everything() } else { got };
        assert_eq!(got, expected, "{when}");
    }
}

/// Rules that read much of the context, several of them forbids: a
/// forbid whose attribute were left out would fail to evaluate, not apply,
/// and turn a deny into an allow.
const RICH: &str = r#"
@id("rich-night")
forbid (principal, action == Leasehold::Action::"Lease", resource)
when { context.time.hour >= 22 || context.time.weekday == 7 };

@id("rich-team")
forbid (principal, action == Leasehold::Action::"Call", resource == Leasehold::Tool::"demo.read")
when { context.workload.attributes.contains("team=red") && context.task.lease_count > 3 };

@id("rich-delegation")
forbid (principal, action, resource)
when { context has delegation && context.delegation.contains("user:mallory@example.com") };

@id("rich-scope")
forbid (principal, action == Leasehold::Action::"Lease", resource)
when { context.scope.contains("admin") && !(context.task.purpose like "*incident*") };

@id("rich-risk")
forbid (principal, action == Leasehold::Action::"Call", resource)
when { context.risk >= 5 && context.target like "vault:*" && !context.break_glass };

@id("rich-bg")
forbid (principal, action == Leasehold::Action::"BreakGlass", resource)
when { context.justification == "" || context.time.now < 0 };
"#;

#[test]
fn a_narrowed_context_decides_exactly_as_the_whole_context() {
    let dir = folder(RICH);
    let narrowed = PolicyEngine::load(dir.path(), roles()).unwrap();
    let mut whole = PolicyEngine::load(dir.path(), roles()).unwrap();
    whole.slicing = false;
    let (mut compared, mut fired) = (0, HashSet::new());
    for team in [None, Some("red")] {
        for user in ["alice@example.com", "mallory@example.com"] {
            for active in [0, 5] {
                for tool in ["demo.read", "demo.write", "demo.admin"] {
                    for bg in [false, true] {
                        for scope in [vec![], vec!["admin".to_owned()]] {
                            for target in ["doc:1", "vault:x"] {
                                for hours in [0, 14] {
                                    let mut w = who("dev:assistant-a");
                                    if let Some(t) = team {
                                        w.attributes.insert("team".into(), t.into());
                                    }
                                    let facts = CallFacts {
                                        tool: tool.into(),
                                        action: "read".into(),
                                        target: target.into(),
                                        break_glass: bg.then(|| "why".to_owned()),
                                        credential: Some(LeaseFacts {
                                            provider: "token".into(),
                                            role: "demo".into(),
                                            scope: scope.clone(),
                                            requested_ttl: 60,
                                            binding: None,
                                        }),
                                        ..CallFacts::default()
                                    };
                                    let t = task(user, active);
                                    let now = Now {
                                        unix: NOW.unix + hours * 3600,
                                    };
                                    let a = narrowed.call(&w, &t, &facts, active, now);
                                    let b = whole.call(&w, &t, &facts, active, now);
                                    assert_eq!(
                                        (a.outcome, &a.policies, &a.reasons, &a.obligations),
                                        (b.outcome, &b.policies, &b.reasons, &b.obligations),
                                        "{team:?} {user} {active} {tool} bg={bg} {scope:?} {target} +{hours}h"
                                    );
                                    if a.outcome == Outcome::Deny {
                                        fired.extend(a.policies.iter().cloned());
                                    }
                                    let cred = facts.credential.as_ref().unwrap();
                                    let lease =
                                        |e: &PolicyEngine| e.lease(&w, &t, cred, active, now);
                                    let (l, m) = (lease(&narrowed), lease(&whole));
                                    assert_eq!((l.outcome, &l.policies), (m.outcome, &m.policies));
                                    compared += 2;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(compared, 2 * 2 * 2 * 2 * 3 * 2 * 2 * 2 * 2);
    // every forbid above decided some case: the comparison covered them
    for id in [
        "rich-night",
        "rich-team",
        "rich-delegation",
        "rich-scope",
        "rich-risk",
    ] {
        assert!(fired.contains(id), "{id} never fired: {fired:?}");
    }
}
