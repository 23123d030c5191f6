//! The layer table in ARCHITECTURE.md, enforced: every `crate::` path in
//! `src/` (in `use` lines and in code) must name a module its own module may
//! import, so the layering cannot decay silently. The table is read from
//! ARCHITECTURE.md itself, so the map and the check cannot disagree.
//!
//! A module is the longest row of the table that prefixes a file's module
//! path (`src/domain/lease/mod.rs` is `domain::lease`, `src/domain/mod.rs`
//! is `domain`). Paths through `super::` are resolved first. Unit tests
//! (`tests.rs` files and `#[cfg(test)] mod tests` blocks) may reach
//! anywhere and are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The table: module -> modules it may import.
type Table = BTreeMap<String, BTreeSet<String>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Rows of the table between the markers in ARCHITECTURE.md:
/// `| `module` | what | `a`, `b` |` (a `—` for nothing).
fn parse_table(doc: &str) -> Result<Table, String> {
    let start = doc
        .find("<!-- layers:start -->")
        .ok_or("ARCHITECTURE.md has no `<!-- layers:start -->` marker")?;
    let end = doc
        .find("<!-- layers:end -->")
        .ok_or("ARCHITECTURE.md has no `<!-- layers:end -->` marker")?;
    let mut table = Table::new();
    for line in doc[start..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| a | b | c |` splits into ["", a, b, c, ""]
        if cells.len() != 5 || !cells[1].starts_with('`') {
            continue;
        }
        let names = |s: &str| -> BTreeSet<String> {
            s.split(',')
                .map(|n| n.trim().trim_matches('`').to_owned())
                .filter(|n| !n.is_empty() && n != "—")
                .collect()
        };
        for module in names(cells[1]) {
            if table.insert(module.clone(), names(cells[3])).is_some() {
                return Err(format!("module `{module}` has two rows"));
            }
        }
    }
    if table.is_empty() {
        return Err("the layer table in ARCHITECTURE.md has no rows".into());
    }
    for (m, allowed) in &table {
        for a in allowed {
            if !table.contains_key(a) {
                return Err(format!("`{m}` may import `{a}`, which has no row"));
            }
        }
    }
    Ok(table)
}

/// The table's modules in an order where each comes after what it may
/// import, or the cycle that prevents one.
fn check_acyclic(table: &Table) -> Result<(), String> {
    let mut done = BTreeSet::new();
    fn visit<'a>(
        m: &'a str,
        table: &'a Table,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Result<(), String> {
        if done.contains(m) {
            return Ok(());
        }
        if let Some(i) = path.iter().position(|p| *p == m) {
            return Err(format!(
                "the layer table has a cycle: {} -> {m}",
                path[i..].join(" -> ")
            ));
        }
        path.push(m);
        for a in &table[m] {
            visit(a, table, path, done)?;
        }
        path.pop();
        done.insert(m);
        Ok(())
    }
    for m in table.keys() {
        visit(m, table, &mut Vec::new(), &mut done)?;
    }
    Ok(())
}

/// The module path of a file under `src/`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The longest row naming a prefix of `path`, if any.
fn row_of(table: &Table, path: &[String]) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|k| table.contains_key(k))
}

/// Product code only: comments, string contents and unit tests removed.
fn code_of(src: &str, file: &Path) -> Vec<(usize, String)> {
    if file.file_name().is_some_and(|n| n == "tests.rs") {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            // everything after a test module is test code (they come last)
            let next = src.lines().nth(i + 1).unwrap_or_default();
            if next.trim_start().starts_with("mod tests") {
                break;
            }
        }
        let code = line.split("//").next().unwrap_or_default();
        // drop string literals, which may mention paths in messages
        let mut kept = String::new();
        let mut in_str = false;
        for c in code.chars() {
            if c == '"' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
        }
        out.push((i + 1, kept));
    }
    out
}

/// Every module path a line names: `crate::a::b`, `super::x`, and the
/// members of `use crate::{a, b::c}` / `use super::{..}` groups.
fn named_paths(line: &str, here: &[String], is_mod_file: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = line.chars().collect();
    let text: String = bytes.iter().collect();
    for (anchor, base) in [
        ("crate::", Vec::new()),
        ("super::", {
            // `super` of a `mod.rs` is the parent of its directory's module
            let mut b = here.to_vec();
            let _ = is_mod_file;
            b.pop();
            b
        }),
    ] {
        let mut from = 0;
        while let Some(pos) = text[from..].find(anchor) {
            let at = from + pos;
            from = at + anchor.len();
            // a word boundary before the anchor
            if at > 0 {
                let prev = text[..at].chars().last().unwrap_or(' ');
                if prev.is_alphanumeric() || prev == '_' || (prev == ':' && anchor == "super::") {
                    continue;
                }
            }
            let rest = &text[from..];
            let mut base = base.clone();
            let mut rest = rest;
            // chains of super::super::
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or_default();
                for item in inner.split(',') {
                    let mut p = base.clone();
                    p.extend(
                        item.trim()
                            .split("::")
                            .map(|s| s.trim().to_owned())
                            .take_while(|s| {
                                !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
                            }),
                    );
                    out.push(p);
                }
            } else {
                let mut p = base;
                p.extend(
                    rest.split("::")
                        .map(|s| {
                            s.chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect::<String>()
                        })
                        .take_while(|s| !s.is_empty()),
                );
                out.push(p);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Items defined at the crate root and where they belong (macros exported
/// with `#[macro_export]` live at the root but belong to their module).
const ROOT_ITEMS: &[(&str, &str)] = &[("event_data", "audit"), ("install_crypto_provider", "lib")];

/// Every import in `src/` that the table does not allow, as
/// `file:line: ...` lines.
fn violations(src_dir: &Path, table: &Table) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src_dir).unwrap().to_path_buf();
        let here = module_path(&rel);
        let Some(me) = row_of(table, &here).or_else(|| here.is_empty().then(|| "lib".into()))
        else {
            out.push(format!(
                "src/{}: module `{}` has no row in the layer table",
                rel.display(),
                here.join("::")
            ));
            continue;
        };
        let is_mod = matches!(
            rel.file_stem().and_then(|s| s.to_str()),
            Some("mod" | "lib" | "main")
        );
        let src = std::fs::read_to_string(&file).unwrap();
        for (line_no, code) in code_of(&src, &rel) {
            for mut path in named_paths(&code, &here, is_mod) {
                if let Some((_, owner)) = ROOT_ITEMS
                    .iter()
                    .find(|(i, _)| path.first().is_some_and(|p| p == i))
                {
                    path = vec![(*owner).to_owned()];
                }
                if path.is_empty() {
                    continue;
                }
                let Some(target) = row_of(table, &path) else {
                    continue; // an item of the crate root or of `lib`
                };
                if target == me || table[&me].contains(&target) {
                    continue;
                }
                out.push(format!(
                    "src/{}:{line_no}: `{me}` imports `{target}` (`{}`), which the layer table in ARCHITECTURE.md does not allow",
                    rel.display(),
                    path.join("::")
                ));
            }
        }
    }
    out
}

fn table() -> Table {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    parse_table(&doc).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_layer_table_has_no_cycle() {
    if let Err(e) = check_acyclic(&table()) {
        panic!("{e}");
    }
}

#[test]
fn every_import_in_src_is_allowed_by_the_layer_table() {
    let v = violations(&root().join("src"), &table());
    assert!(
        v.is_empty(),
        "{} imports break the layering:\n{}",
        v.len(),
        v.join("\n")
    );
}

/// The check can fail: an upward import planted in a copy of `src/` is
/// reported with its file and line.
#[test]
fn an_upward_import_is_reported_with_file_and_line() {
    let table = table();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(
        store.join("mod.rs"),
        "//! the store\nuse crate::hex;\nuse crate::api::ApiError;\nfn f() { crate::domain::Broker::x(); }\n\
         #[cfg(test)]\nmod tests {\n    use crate::api::router;\n}\n",
    )
    .unwrap();
    std::fs::write(
        store.join("txn.rs"),
        "use super::super::metrics::store_commit;\nuse super::{wal, records};\n",
    )
    .unwrap();
    let v = violations(dir.path(), &table);
    assert_eq!(
        v,
        vec![
            "src/store/mod.rs:3: `store` imports `api` (`api::ApiError`), which the layer table in ARCHITECTURE.md does not allow".to_owned(),
            "src/store/mod.rs:4: `store` imports `domain` (`domain::Broker::x`), which the layer table in ARCHITECTURE.md does not allow".to_owned(),
            "src/store/txn.rs:1: `store` imports `metrics` (`metrics::store_commit`), which the layer table in ARCHITECTURE.md does not allow".to_owned(),
        ]
    );
}

#[test]
fn a_cycle_in_the_table_is_refused() {
    let doc = "<!-- layers:start -->\n| module | what | may import |\n|---|---|---|\n\
               | `a` | x | `b` |\n| `b` | y | `c` |\n| `c` | z | `a` |\n<!-- layers:end -->\n";
    let t = parse_table(doc).unwrap();
    assert_eq!(
        check_acyclic(&t).unwrap_err(),
        "the layer table has a cycle: a -> b -> c -> a"
    );
    let bad = "<!-- layers:start -->\n| `a` | x | `nope` |\n<!-- layers:end -->\n";
    assert_eq!(
        parse_table(bad).unwrap_err(),
        "`a` may import `nope`, which has no row"
    );
}
