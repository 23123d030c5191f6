//! The client verbs' answers for people: a table per list the API returns
//! (leases, tasks' leases and calls, approvals, reviews, jobs, fences,
//! events, providers), a key/value table for one object, and JSON for
//! anything else. JSON (`-o json`) is what scripts read, and the default
//! when standard output is not a terminal.

use serde_json::Value;

/// How a client verb prints its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables for people (the default on a terminal).
    Table,
    /// JSON, as the API answered (the default when piped).
    Json,
}

impl Output {
    /// The format asked for, or the one that suits where stdout goes.
    pub fn resolve(asked: Option<Self>) -> Self {
        use std::io::IsTerminal as _;
        asked.unwrap_or(if std::io::stdout().is_terminal() {
            Self::Table
        } else {
            Self::Json
        })
    }
}

/// Columns of each list an answer may hold: (array field, [(header, path)]).
const LISTS: &[(&str, &[(&str, &str)])] = &[
    (
        "leases",
        &[
            ("LEASE", "lease_id"),
            ("STATE", "state"),
            ("WORKLOAD", "workload"),
            ("PROVIDER", "provider"),
            ("ROLE", "role"),
            ("EXPIRES", "expires_at"),
        ],
    ),
    (
        "calls",
        &[
            ("CALL", "call_id"),
            ("DECISION", "decision"),
            ("TOOL", "tool"),
            ("ACTION", "action"),
            ("RESOURCE", "resource"),
            ("LEASE", "lease_id"),
        ],
    ),
    (
        "approvals",
        &[
            ("APPROVAL", "approval_id"),
            ("STATE", "state"),
            ("WORKLOAD", "workload"),
            ("FOR", "on_behalf_of"),
            ("TOOL", "tool"),
            ("ACTION", "action"),
            ("RESOURCE", "resource"),
            ("EXPIRES", "expires_at"),
        ],
    ),
    (
        "reviews",
        &[
            ("TASK", "task_id"),
            ("WORKLOAD", "workload"),
            ("FOR", "on_behalf_of"),
            ("SINCE", "created_at"),
        ],
    ),
    (
        "jobs",
        &[
            ("JOB", "job_id"),
            ("STATE", "state"),
            ("REASON", "reason"),
            ("BY", "created_by"),
            ("STARTED", "created_at"),
        ],
    ),
    (
        "fences",
        &[
            ("KIND", "kind"),
            ("VALUE", "value"),
            ("REASON", "reason"),
            ("BY", "created_by"),
            ("SINCE", "created_at"),
        ],
    ),
    (
        "events",
        &[
            ("SEQ", "seq"),
            ("TIME", "time"),
            ("KIND", "kind"),
            ("TASK", "links.task"),
            ("LEASE", "links.lease"),
        ],
    ),
    ("checks", &[("CHECK", "check"), ("STATUS", "status")]),
    (
        "advisories",
        &[("CHECK", "check"), ("ADVISORY", "advisory")],
    ),
    (
        "lease_counts",
        &[
            ("PROVIDER", "provider"),
            ("STATE", "state"),
            ("LEASES", "count"),
        ],
    ),
    (
        "providers",
        &[
            ("PROVIDER", "name"),
            ("KIND", "kind"),
            ("ROLES", "roles.*.name"),
        ],
    ),
];

/// The answer as people read it.
pub fn render(v: &Value) -> String {
    let Value::Object(m) = v else {
        return pretty(v);
    };
    let mut out = String::new();
    // the object's own scalars first, as KEY  value lines
    let scalars: Vec<(&String, &Value)> = m
        .iter()
        .filter(|(_, x)| !x.is_array() && !x.is_object() && !x.is_null())
        .collect();
    let lists: Vec<(&str, &[(&str, &str)])> = LISTS
        .iter()
        .filter(|(k, _)| m.get(*k).is_some_and(Value::is_array))
        .copied()
        .collect();
    if lists.is_empty() || !scalars.is_empty() {
        let width = scalars.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, x) in &scalars {
            out.push_str(&format!("{k:width$}  {}\n", cell(x)));
        }
        for (k, x) in m.iter().filter(|(k, x)| {
            (x.is_object() || x.is_array()) && !LISTS.iter().any(|(l, _)| l == &k.as_str())
        }) {
            out.push_str(&format!("{k:width$}  {}\n", compact(x)));
        }
    }
    for (key, columns) in lists {
        let rows = m[key].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if !out.is_empty() {
            out.push('\n');
        }
        if rows.is_empty() {
            out.push_str(&format!("no {key}\n"));
            continue;
        }
        out.push_str(&table(columns, rows));
    }
    if out.is_empty() { pretty(v) } else { out }
}

/// One table: a header row, then a row per item, columns padded.
pub fn table(columns: &[(&str, &str)], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, path)| at(r, path)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |vals: Vec<&str>| -> String {
        let mut s = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(columns.iter().map(|(h, _)| *h).collect());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The value at a dotted path (`links.task`; `roles.*.name` joins a list).
fn at(v: &Value, path: &str) -> String {
    let mut cur = vec![v];
    for part in path.split('.') {
        cur = if part == "*" {
            cur.iter().filter_map(|x| x.as_array()).flatten().collect()
        } else {
            cur.iter().filter_map(|x| x.get(part)).collect()
        };
    }
    cur.iter()
        .map(|x| cell(x))
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
        other => compact(other),
    }
}

fn compact(v: &Value) -> String {
    v.to_string()
}

fn pretty(v: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    )
}

/// A hint for an error code, for the person who hit it.
pub fn hint(code: &str) -> Option<&'static str> {
    Some(match code {
        "unauthenticated" => {
            "check --as / --token / LEASEHOLD_TOKEN (`leasehold dev` writes leasehold-data/dev-credentials.json)"
        }
        "forbidden" => "this needs another role; `--as` an operator who has it",
        "policy_denied" => "policy refused it; the decision above names the policies and reasons",
        "fenced" => "a responder fenced this workload, tenant or user: `leasehold fence list`",
        "rate_limited" | "auth_rate_limited" | "overloaded" => "wait a moment and try again",
        "task_not_found" | "lease_not_found" | "approval_not_found" | "job_not_found" => {
            "check the id; a workload sees only its own"
        }
        "task_completed" | "task_expired" => "open a new task",
        "binding_required" => "send a DPoP proof or use mutual TLS for this role",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_become_tables_and_objects_key_values() {
        let v = json!({"leases": [
            {"lease_id": "lease_1", "state": "active", "workload": "dev:a", "provider": "token", "role": "demo", "expires_at": "T1"},
            {"lease_id": "lease_22", "state": "irrevocable", "workload": "dev:b", "provider": "pg", "role": "ro", "expires_at": "T2"}
        ], "next_cursor": "c"});
        let out = render(&v);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "next_cursor  c");
        assert_eq!(
            lines[2],
            "LEASE     STATE        WORKLOAD  PROVIDER  ROLE  EXPIRES"
        );
        assert_eq!(
            lines[3],
            "lease_1   active       dev:a     token     demo  T1"
        );
        assert_eq!(
            lines[4],
            "lease_22  irrevocable  dev:b     pg        ro    T2"
        );
        let one = render(&json!({"lease_id": "lease_1", "state": "active", "scope": ["a"]}));
        assert!(
            one.contains("lease_id  lease_1\n") && one.contains("scope     [\"a\"]\n"),
            "{one}"
        );
        assert_eq!(render(&json!({"approvals": []})), "no approvals\n");
        let p = render(
            &json!({"providers": [{"name": "token", "kind": "token", "roles": [{"name": "demo"}, {"name": "b"}]}]}),
        );
        assert!(p.contains("token     token  demo,b"), "{p}");
        // control characters cannot forge rows
        let forged = render(
            &json!({"fences": [{"kind": "user", "value": "x\nuser  evil", "reason": "r", "created_by": "o", "created_at": "t"}]}),
        );
        assert_eq!(forged.lines().count(), 2, "{forged}");
    }
}
