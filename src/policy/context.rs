//! The request context a decision evaluates: the facts of the principal,
//! the task, the call and the time, built only as far as the policies in
//! the slice read them.

//! Runtime authorization with Cedar: every task, call and lease is decided
//! at the moment of action against policy as code. Pure: no IO but loading
//! the policy folder; no store, no clock (the caller passes the time).
//!
//! A policy folder holds `*.cedarschema` (the schema), `*.cedar` (policies)
//! and `entities.json` (tools, groups, workloads' group memberships: grants as
//! data). Everything is validated strictly against the schema; a bad set is
//! refused with file and line, and a reload that fails leaves the old set in
//! force ([`PolicyEngine::reload`] swaps atomically).
//!
//! Obligations ride on permit policies as annotations:
//! `@approval("required")`, `@max_ttl("300")`, `@break_glass("only")`, and
//! `@reason("...")` for the text a deny shows.

use cedar_policy::RestrictedExpression;

use super::*;

/// A decision's context, holding only what the policies deciding it read.
pub(super) struct Ctx<'a> {
    pub(super) reads: &'a Reads,
    pub(super) pairs: Vec<(String, RestrictedExpression)>,
}

type Field<'a> = (&'static str, &'a dyn Fn() -> RestrictedExpression);

impl Ctx<'_> {
    pub(super) fn put(&mut self, name: &'static str, value: impl FnOnce() -> RestrictedExpression) {
        if self.reads.wants(name) {
            self.pairs.push((name.to_owned(), value()));
        }
    }

    fn record(&mut self, name: &'static str, fields: &[Field<'_>]) {
        if self.reads.wants(name) {
            let keep = fields.iter().filter(|(f, _)| self.reads.wants_in(name, f));
            let rec = record(keep.map(|(f, v)| (*f, v())));
            self.pairs.push((name.to_owned(), rec));
        }
    }
}

/// Wall-clock facts policies may use, from the broker's clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub unix: i64,
}

impl Now {
    pub(super) fn put(self, c: &mut Ctx) {
        let days = self.unix.div_euclid(86_400);
        let hour = self.unix.rem_euclid(86_400) / 3600;
        // 1970-01-01 was a Thursday (4); Monday = 1
        let weekday = (days + 3).rem_euclid(7) + 1;
        c.record(
            "time",
            &[
                ("now", &|| RestrictedExpression::new_long(self.unix)),
                ("hour", &|| RestrictedExpression::new_long(hour)),
                ("weekday", &|| RestrictedExpression::new_long(weekday)),
            ],
        );
    }
}

pub(super) fn long(v: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX))
}

pub(super) fn string(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

pub(super) fn strings<'a>(v: impl IntoIterator<Item = &'a String>) -> RestrictedExpression {
    RestrictedExpression::new_set(v.into_iter().map(|s| string(s)))
}

fn record<'a>(
    fields: impl Iterator<Item = (&'a str, RestrictedExpression)>,
) -> RestrictedExpression {
    // field names are fixed, distinct literals: this cannot fail
    RestrictedExpression::new_record(fields.map(|(k, v)| (k.to_owned(), v)))
        .unwrap_or_else(|_| RestrictedExpression::new_bool(false))
}

impl Principal {
    pub(super) fn put(&self, c: &mut Ctx) {
        let attrs = || {
            let attrs: Vec<String> = self
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            strings(&attrs)
        };
        c.record(
            "workload",
            &[
                ("id", &|| string(&self.id)),
                ("issuer", &|| string(&self.issuer)),
                ("tenant", &|| string(&self.tenant)),
                ("attributes", &attrs),
            ],
        );
    }
}

impl TaskFacts {
    pub(super) fn put(&self, c: &mut Ctx) {
        c.record(
            "task",
            &[
                ("id", &|| string(&self.id)),
                ("purpose", &|| string(&self.purpose)),
                ("declared_tools", &|| strings(&self.declared_tools)),
                ("prompt_sha256", &|| string(&self.prompt_sha256)),
                ("user", &|| string(&self.user)),
                ("active_leases", &|| long(self.active_leases)),
                ("lease_count", &|| long(self.lease_count)),
                ("remaining_seconds", &|| long(self.remaining_seconds)),
            ],
        );
    }

    pub(super) fn delegation(&self, workload: &str) -> RestrictedExpression {
        strings(&[
            format!("user:{}", self.user),
            format!("workload:{workload}"),
        ])
    }
}
