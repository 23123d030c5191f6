//! Loading a policy folder: the schema, the policies and the entities,
//! validated strictly, every problem with file and line; each set sliced
//! by action and resource so a decision evaluates only what can apply, and
//! the context attributes each slice reads found from the policies' JSON.

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

use cedar_policy::{
    ActionConstraint, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy, PolicyId,
    PolicySet, ResourceConstraint, RestrictedExpression, Schema, ValidationMode, Validator,
};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use super::*;

/// A policy folder that could not be loaded: every problem, each as
/// `file:line:column: message`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct LoadError {
    pub problems: Vec<String>,
}

impl LoadError {
    fn one(p: impl Into<String>) -> Self {
        Self {
            problems: vec![p.into()],
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct PolicyMeta {
    file: String,
    pub(super) obligations: Obligations,
    pub(super) reason: Option<String>,
    /// Policies annotated `@tenant("t")` are named only to callers of `t`.
    pub(super) tenant: Option<String>,
}

/// The actions of the schema.
pub(super) const ACTIONS: [&str; 4] = ["OpenTask", "Call", "Lease", "BreakGlass"];

/// A loaded, validated policy folder.
pub struct Loaded {
    pub(super) set: PolicySet,
    /// The policies that can apply to each (action, resource), so a decision
    /// evaluates only those: a policy whose action or resource scope cannot
    /// match can neither permit nor forbid, so leaving it out changes nothing
    /// but the time taken.
    pub(super) slices: HashMap<(usize, EntityUid), Slice>,
    pub(super) empty: Slice,
    pub(super) actions: [EntityUid; 4],
    pub(super) entities: Entities,
    pub(super) meta: HashMap<PolicyId, PolicyMeta>,
    tools: HashSet<String>,
    pub(super) roles: HashSet<String>,
    /// SHA-256 over every file, in name order: which set decided.
    pub version: String,
    pub files: Vec<String>,
    pub policy_count: usize,
    /// Whether any policy reads the workload's count of active leases
    /// (`context.workload_active_leases`).
    pub(super) reads_workload_active: bool,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("version", &self.version)
            .field("policies", &self.policy_count)
            .finish()
    }
}

impl Loaded {
    /// Load and validate a folder.
    pub fn from_dir(dir: &Path, roles: &[RoleEntity]) -> Result<Self, LoadError> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| LoadError::one(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let (mut schema_src, mut policies, mut entities_src) = (None, Vec::new(), None);
        let mut files = Vec::new();
        for p in &names {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text =
                std::fs::read_to_string(p).map_err(|e| LoadError::one(format!("{name}: {e}")))?;
            match p.extension().and_then(|e| e.to_str()) {
                Some("cedarschema") => {
                    if schema_src.is_some() {
                        return Err(LoadError::one(format!(
                            "{name}: a second schema; keep one *.cedarschema"
                        )));
                    }
                    schema_src = Some((name.clone(), text.clone()));
                }
                Some("cedar") => policies.push((name.clone(), text.clone())),
                Some("json") if name == "entities.json" => entities_src = Some(text.clone()),
                _ => continue,
            }
            digest.update(name.as_bytes());
            digest.update(&[0]);
            digest.update(text.as_bytes());
            digest.update(&[0]);
            files.push(name);
        }
        let (schema_file, schema_text) = schema_src
            .ok_or_else(|| LoadError::one(format!("{}: no *.cedarschema file", dir.display())))?;
        let (schema, warnings) = Schema::from_cedarschema_str(&schema_text)
            .map_err(|e| LoadError::one(located(&schema_file, &schema_text, &e)))?;
        drop(warnings.collect::<Vec<_>>());
        if policies.is_empty() {
            return Err(LoadError::one(format!(
                "{}: no *.cedar policy files",
                dir.display()
            )));
        }
        Self::build(
            schema,
            &policies,
            entities_src.as_deref(),
            roles,
            crate::hex::encode(digest.finish().as_ref()),
            files,
        )
    }

    fn build(
        schema: Schema,
        sources: &[(String, String)],
        entities_json: Option<&str>,
        roles: &[RoleEntity],
        version: String,
        files: Vec<String>,
    ) -> Result<Self, LoadError> {
        let (set, meta) = Self::parse_policies(sources)?;
        Self::validate_policies(&schema, &set, &meta, sources)?;
        let (entities, tools, role_names) = Self::entities(&schema, entities_json, roles)?;
        let policy_count = meta.len();
        let action_type = type_name("Action")?;
        let actions = ACTIONS
            .map(|a| EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a)));
        let slices = slice(&set, &entities, &actions)?;
        let reads_workload_active = Reads::of(set.policies()).wants("workload_active_leases");
        Ok(Self {
            reads_workload_active,
            set,
            slices,
            empty: Slice {
                set: PolicySet::new(),
                reads: Reads::default(),
            },
            actions,
            entities,
            meta,
            tools,
            roles: role_names,
            version,
            files,
            policy_count,
        })
    }

    /// Every policy of every file, with its id and obligations; all
    /// problems at once, each with file and line.
    fn parse_policies(
        sources: &[(String, String)],
    ) -> Result<(PolicySet, HashMap<PolicyId, PolicyMeta>), LoadError> {
        let mut problems = Vec::new();
        let mut set = PolicySet::new();
        let mut meta = HashMap::new();
        for (file, text) in sources {
            let parsed = match PolicySet::from_str(text) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(located(file, text, &e));
                    continue;
                }
            };
            let stem = file.trim_end_matches(".cedar");
            for (n, p) in parsed.policies().enumerate() {
                let id = p
                    .annotation("id")
                    .map_or_else(|| format!("{stem}.{n}"), str::to_owned);
                let pid = PolicyId::new(&id);
                let ann = |k: &str| p.annotation(k).map(str::to_owned);
                let mut ob = Obligations::default();
                match ann("approval").as_deref() {
                    None => {}
                    Some("required") => ob.approval = true,
                    Some(v) => problems.push(format!(
                        "{file}: policy {id}: @approval(\"{v}\"): only \"required\""
                    )),
                }
                match ann("break_glass").as_deref() {
                    None => {}
                    Some("only") => ob.break_glass_only = true,
                    Some(v) => problems.push(format!(
                        "{file}: policy {id}: @break_glass(\"{v}\"): only \"only\""
                    )),
                }
                if let Some(v) = ann("max_ttl") {
                    match v.parse::<u64>() {
                        Ok(n) if n > 0 => ob.max_ttl = Some(n),
                        _ => problems.push(format!(
                            "{file}: policy {id}: @max_ttl(\"{v}\"): a positive number of seconds"
                        )),
                    }
                }
                if meta.contains_key(&pid) {
                    problems.push(format!("{file}: policy id `{id}` is used twice"));
                    continue;
                }
                meta.insert(
                    pid.clone(),
                    PolicyMeta {
                        file: file.clone(),
                        obligations: ob,
                        reason: ann("reason"),
                        tenant: ann("tenant"),
                    },
                );
                if let Err(e) = set.add(p.new_id(pid)) {
                    problems.push(format!("{file}: {e}"));
                }
            }
        }
        if !problems.is_empty() {
            return Err(LoadError { problems });
        }
        Ok((set, meta))
    }

    /// The set against the schema, strictly.
    fn validate_policies(
        schema: &Schema,
        set: &PolicySet,
        meta: &HashMap<PolicyId, PolicyMeta>,
        sources: &[(String, String)],
    ) -> Result<(), LoadError> {
        let mut problems = Vec::new();
        let validation = Validator::new(schema.clone()).validate(set, ValidationMode::Strict);
        for e in validation.validation_errors() {
            let file = meta.get(e.policy_id()).map_or("?", |m| m.file.as_str());
            let text = sources
                .iter()
                .find(|(f, _)| f == file)
                .map_or("", |(_, t)| t.as_str());
            problems.push(located(file, text, e));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError { problems })
        }
    }

    /// The entities: `entities.json`, one `ProviderRole` per configured
    /// role, and the broker; with the tool names and role names.
    fn entities(
        schema: &Schema,
        entities_json: Option<&str>,
        roles: &[RoleEntity],
    ) -> Result<(Entities, HashSet<String>, HashSet<String>), LoadError> {
        let mut ents: Vec<Entity> = match entities_json {
            Some(json) => Entities::from_json_str(json, Some(schema))
                .map_err(|e| LoadError::one(format!("entities.json: {e}")))?
                .into_iter()
                .collect(),
            None => Vec::new(),
        };
        let tools: HashSet<String> = ents
            .iter()
            .filter(|e| e.uid().type_name().basename() == "Tool")
            .map(|e| e.uid().id().unescaped().to_owned())
            .collect();
        let mut role_names = HashSet::new();
        for r in roles {
            let name = format!("{}/{}", r.provider, r.role);
            let attrs = [
                (
                    "provider".to_owned(),
                    RestrictedExpression::new_string(r.provider.clone()),
                ),
                (
                    "role".to_owned(),
                    RestrictedExpression::new_string(r.role.clone()),
                ),
                (
                    "max_ttl".to_owned(),
                    RestrictedExpression::new_long(i64::try_from(r.max_ttl).unwrap_or(i64::MAX)),
                ),
            ];
            let e = Entity::new(
                uid("ProviderRole", &name)?,
                attrs.into_iter().collect(),
                HashSet::new(),
            )
            .map_err(|e| LoadError::one(format!("provider role {name}: {e}")))?;
            ents.push(e);
            role_names.insert(name);
        }
        ents.push(Entity::new_no_attrs(
            uid("Broker", "leasehold")?,
            HashSet::new(),
        ));
        let entities = Entities::from_entities(ents, Some(schema))
            .map_err(|e| LoadError::one(format!("entities: {e}")))?;
        Ok((entities, tools, role_names))
    }

    pub fn has_tool(&self, tool: &str) -> bool {
        self.tools.contains(tool)
    }
}

const NS: &str = "Leasehold";

pub(super) fn type_name(t: &str) -> Result<EntityTypeName, LoadError> {
    EntityTypeName::from_str(&format!("{NS}::{t}"))
        .map_err(|e| LoadError::one(format!("entity type {t}: {e}")))
}

pub(super) fn uid(t: &str, id: &str) -> Result<EntityUid, LoadError> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(t)?,
        EntityId::new(id),
    ))
}

fn action_matches(p: &Policy, action: &EntityUid) -> bool {
    match p.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(a) => &a == action,
        ActionConstraint::In(list) => list.contains(action),
    }
}

fn resource_matches(p: &Policy, r: &EntityUid, ancestors: &HashSet<EntityUid>) -> bool {
    let within = |u: &EntityUid| u == r || ancestors.contains(u);
    match p.resource_constraint() {
        ResourceConstraint::Any => true,
        ResourceConstraint::Eq(u) => &u == r,
        ResourceConstraint::In(u) => within(&u),
        ResourceConstraint::Is(t) => r.type_name() == &t,
        ResourceConstraint::IsIn(t, u) => r.type_name() == &t && within(&u),
    }
}

/// The policies that can apply to one (action, resource), and what they
/// read of the context.
pub(super) struct Slice {
    pub(super) set: PolicySet,
    pub(super) reads: Reads,
}

/// The context attributes a set of policies reads, so a decision builds only
/// those: building Cedar's context (every value evaluated into Cedar's own
/// form) cost twice the authorization itself. Found from each policy's JSON
/// form, where every read is a node `.` or `has` with a `left` and an
/// `attr`: Cedar has no computed attribute names, so a name not found there
/// is read by no policy. `context` used other than through an attribute
/// read (compared whole, say) means everything is built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reads {
    pub(super) all: bool,
    /// Attribute -> the fields read of it, or `None` for its whole value.
    pub(super) attrs: HashMap<String, Option<HashSet<String>>>,
}

impl Reads {
    pub(crate) fn everything() -> Self {
        Self {
            all: true,
            attrs: HashMap::new(),
        }
    }

    pub(crate) fn of<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut r = Self::default();
        for p in policies {
            match p.to_json() {
                Ok(json) => r.walk(&json),
                // not expected; if it happens, build everything
                Err(_) => r.all = true,
            }
        }
        r
    }

    fn walk(&mut self, v: &serde_json::Value) {
        use serde_json::Value;
        fn is_context(v: &Value) -> bool {
            v.as_object().is_some_and(|m| {
                m.len() == 1 && m.get("Var").and_then(Value::as_str) == Some("context")
            })
        }
        // `context.<name>`, as an expression
        fn context_attr(v: &Value) -> Option<&str> {
            let m = v.as_object().filter(|m| m.len() == 1)?;
            let n = m.get(".")?.as_object()?;
            is_context(n.get("left")?)
                .then(|| n.get("attr")?.as_str())
                .flatten()
        }
        match v {
            Value::Array(a) => a.iter().for_each(|v| self.walk(v)),
            Value::Object(m) => {
                if m.len() == 1 {
                    for op in [".", "has"] {
                        let Some(n) = m.get(op).and_then(Value::as_object) else {
                            continue;
                        };
                        let (Some(left), Some(attr)) =
                            (n.get("left"), n.get("attr").and_then(Value::as_str))
                        else {
                            continue;
                        };
                        if is_context(left) {
                            self.attrs.insert(attr.to_owned(), None);
                            return;
                        }
                        if let Some(top) = context_attr(left) {
                            let e = self
                                .attrs
                                .entry(top.to_owned())
                                .or_insert_with(|| Some(HashSet::new()));
                            if let Some(fields) = e {
                                fields.insert(attr.to_owned());
                            }
                            return;
                        }
                    }
                    if is_context(v) {
                        self.all = true;
                        return;
                    }
                }
                m.values().for_each(|v| self.walk(v));
            }
            _ => {}
        }
    }

    pub(super) fn wants(&self, name: &str) -> bool {
        self.all || self.attrs.contains_key(name)
    }

    pub(super) fn wants_in(&self, name: &str, field: &str) -> bool {
        self.all
            || match self.attrs.get(name) {
                None => false,
                Some(None) => true,
                Some(Some(fields)) => fields.contains(field),
            }
    }
}

/// The resources each action decides on, and the policies that can apply.
fn slice(
    set: &PolicySet,
    entities: &Entities,
    actions: &[EntityUid; 4],
) -> Result<HashMap<(usize, EntityUid), Slice>, LoadError> {
    let resource_type = |i: usize| match ACTIONS[i] {
        "OpenTask" => "Broker",
        "Lease" => "ProviderRole",
        _ => "Tool",
    };
    let mut out = HashMap::new();
    for e in entities.iter() {
        let uid = e.uid();
        let ancestors: HashSet<EntityUid> = entities
            .ancestors(&uid)
            .map(|a| a.cloned().collect())
            .unwrap_or_default();
        for (i, action) in actions.iter().enumerate() {
            if uid.type_name().basename() != resource_type(i) {
                continue;
            }
            let picked: Vec<Policy> = set
                .policies()
                .filter(|p| action_matches(p, action) && resource_matches(p, &uid, &ancestors))
                .cloned()
                .collect();
            let reads = Reads::of(&picked);
            let set = PolicySet::from_policies(picked)
                .map_err(|e| LoadError::one(format!("slicing: {e}")))?;
            out.insert((i, uid.clone()), Slice { set, reads });
        }
    }
    Ok(out)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let upto = &text[..offset.min(text.len())];
    let line = upto.matches('\n').count() + 1;
    let col = upto.rfind('\n').map_or(upto.len(), |i| upto.len() - i - 1) + 1;
    (line, col)
}

/// Render a Cedar diagnostic as `file:line:col: message (help)`.
fn located(file: &str, text: &str, d: &dyn miette::Diagnostic) -> String {
    let at = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| line_col(text, l.offset()))
        .map_or_else(|| file.to_owned(), |(l, c)| format!("{file}:{l}:{c}"));
    let help = d.help().map(|h| format!(" ({h})")).unwrap_or_default();
    format!("{at}: {d}{help}")
}
