//! Access lists: a template that grants ON an object TO each lease's role
//! grows that object's access list by one entry per concurrent lease, and
//! the list lives in one catalog row. `config validate` warns about such a
//! template ([`grants_on_an_object`]); at health time
//! [`crate::PostgresProvider`]'s advisories say how full the fullest lists
//! are ([`full_lists`]).

/// About how many entries one object's access list holds before its catalog
/// row outgrows a page: measured with `leasehold-bench postgres --role
/// read`, which stops at about 600 concurrent leases.
pub const ACL_CEILING: usize = 600;

/// Whether a template statement grants a privilege ON an object TO the
/// lease's role (rather than making the lease's role a member of a group).
pub fn grants_on_an_object(statement: &str) -> bool {
    let words: Vec<String> = statement
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let to_lease = statement.contains("{{name}}");
    words.first().is_some_and(|w| w == "GRANT") && words.iter().any(|w| w == "ON") && to_lease
}

/// From half of [`ACL_CEILING`] on, a list is reported.
pub const REPORT_FROM: usize = ACL_CEILING / 2;

/// The objects whose access list holds at least `from` entries, one of
/// them a role named with `prefix` (a lease's), fullest first (at most
/// five): databases, schemas and relations (tables, views, sequences), each
/// with its entry count. Catalogs are read, nothing is written.
pub async fn full_lists(
    conn: &tokio_postgres::Client,
    from: usize,
    prefix: &str,
) -> Result<Vec<(String, String, usize)>, tokio_postgres::Error> {
    let like = format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%")
    );
    let rows = conn
        .query(
            "SELECT kind, name, n FROM ( \
               SELECT 'database' AS kind, datname::text AS name, datacl AS acl, \
                      cardinality(datacl) AS n FROM pg_database WHERE datacl IS NOT NULL \
               UNION ALL SELECT 'schema', nspname::text, nspacl, cardinality(nspacl) \
                 FROM pg_namespace WHERE nspacl IS NOT NULL \
               UNION ALL SELECT 'relation', oid::regclass::text, relacl, cardinality(relacl) \
                 FROM pg_class WHERE relacl IS NOT NULL \
             ) lists \
             WHERE n >= $1 AND EXISTS ( \
               SELECT 1 FROM aclexplode(acl) a WHERE pg_get_userbyid(a.grantee) LIKE $2) \
             ORDER BY n DESC, kind, name LIMIT 5",
            &[&i32::try_from(from).unwrap_or(i32::MAX), &like],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let n: i32 = r.get(2);
            (r.get(0), r.get(1), usize::try_from(n).unwrap_or(0))
        })
        .collect())
}

/// The advisory for one full list: what, how full, and what to change.
pub fn advisory(kind: &str, name: &str, entries: usize, roles: &[String]) -> String {
    format!(
        "the access list of {kind} {name} holds {entries} entries; about {ACL_CEILING} fit in its \
         catalog row, and past that every grant to it fails (`row is too big`), so leases of \
         role(s) {} (which grant on an object to each lease's role) will stop issuing. Grant to a \
         group role once and list it in `in_roles` (or `scope_roles`) instead",
        roles.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::grants_on_an_object;

    #[test]
    fn grants_on_objects_are_told_from_memberships() {
        assert!(grants_on_an_object(
            "GRANT USAGE ON SCHEMA {{scope}} TO {{name}}"
        ));
        assert!(grants_on_an_object(
            "grant select on all tables in schema public to {{name}}"
        ));
        assert!(!grants_on_an_object("GRANT app_read TO {{name}}"));
        assert!(!grants_on_an_object(
            "ALTER ROLE {{name}} SET search_path = app"
        ));
        assert!(!grants_on_an_object("GRANT SELECT ON t TO app_read"));
    }
}
