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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, Request, ResourceConstraint,
    RestrictedExpression, Schema, ValidationMode, Validator,
};

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

/// What a permit policy obliges, from its annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Obligations {
    pub approval: bool,
    pub max_ttl: Option<u64>,
    pub break_glass_only: bool,
}

#[derive(Clone, Debug)]
struct PolicyMeta {
    file: String,
    obligations: Obligations,
    reason: Option<String>,
    /// Policies annotated `@tenant("t")` are named only to callers of `t`.
    tenant: Option<String>,
}

/// The actions of the schema.
const ACTIONS: [&str; 4] = ["OpenTask", "Call", "Lease", "BreakGlass"];

/// A loaded, validated policy folder.
pub struct Loaded {
    set: PolicySet,
    /// The policies that can apply to each (action, resource), so a decision
    /// evaluates only those: a policy whose action or resource scope cannot
    /// match can neither permit nor forbid, so leaving it out changes nothing
    /// but the time taken.
    slices: HashMap<(usize, EntityUid), Slice>,
    empty: Slice,
    actions: [EntityUid; 4],
    entities: Entities,
    meta: HashMap<PolicyId, PolicyMeta>,
    tools: HashSet<String>,
    roles: HashSet<String>,
    /// SHA-256 over every file, in name order: which set decided.
    pub version: String,
    pub files: Vec<String>,
    pub policy_count: usize,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("version", &self.version)
            .field("policies", &self.policy_count)
            .finish()
    }
}

/// A provider role the broker offers, made into a `ProviderRole` entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleEntity {
    pub provider: String,
    pub role: String,
    pub max_ttl: u64,
}

const NS: &str = "Leasehold";

fn type_name(t: &str) -> Result<EntityTypeName, LoadError> {
    EntityTypeName::from_str(&format!("{NS}::{t}"))
        .map_err(|e| LoadError::one(format!("entity type {t}: {e}")))
}

fn uid(t: &str, id: &str) -> Result<EntityUid, LoadError> {
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
struct Slice {
    set: PolicySet,
    reads: Reads,
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
    all: bool,
    /// Attribute -> the fields read of it, or `None` for its whole value.
    attrs: HashMap<String, Option<HashSet<String>>>,
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

    fn wants(&self, name: &str) -> bool {
        self.all || self.attrs.contains_key(name)
    }

    fn wants_in(&self, name: &str, field: &str) -> bool {
        self.all
            || match self.attrs.get(name) {
                None => false,
                Some(None) => true,
                Some(Some(fields)) => fields.contains(field),
            }
    }
}

/// A decision's context, holding only what the policies deciding it read.
struct Ctx<'a> {
    reads: &'a Reads,
    pairs: Vec<(String, RestrictedExpression)>,
}

type Field<'a> = (&'static str, &'a dyn Fn() -> RestrictedExpression);

impl Ctx<'_> {
    fn put(&mut self, name: &'static str, value: impl FnOnce() -> RestrictedExpression) {
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
        let mut problems = Vec::new();
        let mut set = PolicySet::new();
        let mut meta = HashMap::new();
        let mut texts: HashMap<String, &str> = HashMap::new();
        for (file, text) in sources {
            texts.insert(file.clone(), text);
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
        let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        for e in validation.validation_errors() {
            let file = meta.get(e.policy_id()).map_or("?", |m| m.file.as_str());
            let text = texts.get(file).copied().unwrap_or("");
            problems.push(located(file, text, e));
        }
        if !problems.is_empty() {
            return Err(LoadError { problems });
        }
        let mut ents: Vec<Entity> = match entities_json {
            Some(json) => Entities::from_json_str(json, Some(&schema))
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
        let entities = Entities::from_entities(ents, Some(&schema))
            .map_err(|e| LoadError::one(format!("entities: {e}")))?;
        let policy_count = meta.len();
        let action_type = type_name("Action")?;
        let actions = ACTIONS
            .map(|a| EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a)));
        let slices = slice(&set, &entities, &actions)?;
        Ok(Self {
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

    pub fn has_tool(&self, tool: &str) -> bool {
        self.tools.contains(tool)
    }
}

/// The policy engine: the loaded set behind a lock, swapped whole on reload.
pub struct PolicyEngine {
    dir: PathBuf,
    roles: Vec<RoleEntity>,
    current: RwLock<Arc<Loaded>>,
    authorizer: Authorizer,
    workload_type: EntityTypeName,
    tool_type: EntityTypeName,
    role_type: EntityTypeName,
    broker_uid: EntityUid,
    /// Off only in the test that proves slicing (of the set and of the
    /// context) decides as the whole set with the whole context.
    slicing: bool,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PolicyEngine {
    pub fn load(dir: &Path, roles: Vec<RoleEntity>) -> Result<Self, LoadError> {
        let loaded = Loaded::from_dir(dir, &roles)?;
        Ok(Self {
            dir: dir.to_owned(),
            roles,
            current: RwLock::new(Arc::new(loaded)),
            authorizer: Authorizer::new(),
            workload_type: type_name("Workload")?,
            tool_type: type_name("Tool")?,
            role_type: type_name("ProviderRole")?,
            broker_uid: uid("Broker", "leasehold")?,
            slicing: true,
        })
    }

    /// Load the folder again; on success swap it in whole, on failure keep
    /// the old set and report every problem.
    pub fn reload(&self) -> Result<Arc<Loaded>, LoadError> {
        let next = Arc::new(Loaded::from_dir(&self.dir, &self.roles)?);
        if let Ok(mut cur) = self.current.write() {
            *cur = next.clone();
        }
        Ok(next)
    }

    pub fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

// === requests ===

/// Who asks, from its verified identity.
#[derive(Clone, Debug, Default)]
pub struct Principal {
    pub id: String,
    pub issuer: String,
    pub tenant: String,
    pub attributes: BTreeMap<String, String>,
}

/// The task a call or lease belongs to.
#[derive(Clone, Debug, Default)]
pub struct TaskFacts {
    pub id: String,
    pub purpose: String,
    pub declared_tools: Vec<String>,
    pub prompt_sha256: String,
    pub user: String,
    pub active_leases: u64,
    pub lease_count: u64,
    pub remaining_seconds: u64,
}

/// A tool call to decide.
#[derive(Clone, Debug, Default)]
pub struct CallFacts {
    pub tool: String,
    pub action: String,
    pub target: String,
    pub arguments_sha256: String,
    pub break_glass: Option<String>,
    pub credential: Option<LeaseFacts>,
}

/// A credential to decide (with a call, or directly).
#[derive(Clone, Debug, Default)]
pub struct LeaseFacts {
    pub provider: String,
    pub role: String,
    pub scope: Vec<String>,
    pub requested_ttl: u64,
}

/// The outcome of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny,
    ApprovalRequired,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::ApprovalRequired => "approval_required",
        }
    }
}

/// A decision and why.
#[derive(Clone, Debug)]
pub struct Decision {
    pub outcome: Outcome,
    /// Ids of the policies that determined it (all, for the record).
    pub policies: Vec<String>,
    /// Why, for people.
    pub reasons: Vec<String>,
    pub obligations: Obligations,
    /// The policy set that decided.
    pub version: String,
}

impl Decision {
    /// Policy ids a caller of `tenant` may see: others' scoped policies are
    /// counted, not named.
    pub fn visible_policies(&self, loaded: &Loaded, tenant: &str) -> Vec<String> {
        self.policies
            .iter()
            .map(|p| {
                match loaded
                    .meta
                    .get(&PolicyId::new(p))
                    .and_then(|m| m.tenant.as_deref())
                {
                    Some(t) if t != tenant => "(a policy of another tenant)".to_owned(),
                    _ => p.clone(),
                }
            })
            .collect()
    }
}

/// Wall-clock facts policies may use, from the broker's clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub unix: i64,
}

impl Now {
    fn put(self, c: &mut Ctx) {
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

fn long(v: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX))
}

fn string(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

fn strings<'a>(v: impl IntoIterator<Item = &'a String>) -> RestrictedExpression {
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
    fn put(&self, c: &mut Ctx) {
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
    fn put(&self, c: &mut Ctx) {
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

    fn delegation(&self, workload: &str) -> RestrictedExpression {
        strings(&[
            format!("user:{}", self.user),
            format!("workload:{workload}"),
        ])
    }
}

struct Evaluated {
    allowed: bool,
    /// Determining policies: permits when allowed, forbids when denied.
    policies: Vec<PolicyId>,
    errors: Vec<String>,
}

impl PolicyEngine {
    fn eval(
        &self,
        l: &Loaded,
        principal: &str,
        action: &str,
        resource: EntityUid,
        context: impl FnOnce(&mut Ctx),
    ) -> Evaluated {
        let Some(ai) = ACTIONS.iter().position(|a| *a == action) else {
            return Evaluated {
                allowed: false,
                policies: vec![],
                errors: vec![format!("unknown action {action}")],
            };
        };
        let everything;
        let (policies, reads) = if self.slicing {
            let s = l.slices.get(&(ai, resource.clone())).unwrap_or(&l.empty);
            (&s.set, &s.reads)
        } else {
            // the whole set and the whole context, which slicing must decide as
            everything = Reads::everything();
            (&l.set, &everything)
        };
        let mut ctx = Ctx {
            reads,
            pairs: Vec::new(),
        };
        context(&mut ctx);
        let request = (|| {
            let ctx = Context::from_pairs(ctx.pairs).map_err(|e| e.to_string())?;
            let p = EntityUid::from_type_name_and_id(
                self.workload_type.clone(),
                EntityId::new(principal),
            );
            Request::new(p, l.actions[ai].clone(), resource, ctx, None).map_err(|e| e.to_string())
        })();
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                return Evaluated {
                    allowed: false,
                    policies: vec![],
                    errors: vec![e],
                };
            }
        };
        let resp = self
            .authorizer
            .is_authorized(&request, policies, &l.entities);
        let d = resp.diagnostics();
        let mut policies: Vec<PolicyId> = d.reason().cloned().collect();
        // Cedar reports them as a set; sort so decisions and events are deterministic
        policies.sort_by_key(ToString::to_string);
        Evaluated {
            allowed: resp.decision() == CedarDecision::Allow,
            policies,
            errors: d.errors().map(ToString::to_string).collect(),
        }
    }

    fn denial(&self, l: &Loaded, e: &Evaluated, what: &str) -> Vec<String> {
        let mut reasons: Vec<String> = e
            .policies
            .iter()
            .map(|p| match l.meta.get(p).and_then(|m| m.reason.clone()) {
                Some(r) => r,
                None => format!("forbidden by policy {p}"),
            })
            .collect();
        if reasons.is_empty() {
            reasons.push(format!("no policy permits {what}"));
        }
        if !e.errors.is_empty() {
            tracing::warn!(errors = ?e.errors, "policies failed to evaluate (treated as not applying)");
        }
        reasons
    }

    fn deny(&self, l: &Loaded, policies: &[PolicyId], reasons: Vec<String>) -> Decision {
        Decision {
            outcome: Outcome::Deny,
            policies: policies.iter().map(ToString::to_string).collect(),
            reasons,
            obligations: Obligations::default(),
            version: l.version.clone(),
        }
    }

    /// May this workload open this task?
    pub fn open_task(
        &self,
        who: &Principal,
        task: &TaskFacts,
        requested_ttl: u64,
        now: Now,
    ) -> Decision {
        let l = self.current();
        let resource = self.broker_uid.clone();
        let e = self.eval(&l, &who.id, "OpenTask", resource, |c| {
            who.put(c);
            c.put("purpose", || string(&task.purpose));
            c.put("declared_tools", || strings(&task.declared_tools));
            c.put("prompt_sha256", || string(&task.prompt_sha256));
            c.put("user", || string(&task.user));
            c.put("requested_ttl", || long(requested_ttl));
            now.put(c);
        });
        if !e.allowed {
            let reasons = self.denial(&l, &e, "opening this task");
            return self.deny(&l, &e.policies, reasons);
        }
        self.permit(&l, &e.policies, false)
    }

    /// Combine the obligations of the permits that count.
    fn permit(&self, l: &Loaded, permits: &[PolicyId], break_glass: bool) -> Decision {
        let mut ob = Obligations::default();
        for p in permits {
            if let Some(m) = l.meta.get(p) {
                ob.approval |= m.obligations.approval;
                ob.max_ttl = match (ob.max_ttl, m.obligations.max_ttl) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        ob.break_glass_only = break_glass;
        // break-glass is the loud way around an approval, not through one
        let outcome = if ob.approval && !break_glass {
            Outcome::ApprovalRequired
        } else {
            Outcome::Allow
        };
        Decision {
            outcome,
            policies: permits.iter().map(ToString::to_string).collect(),
            reasons: vec![],
            obligations: ob,
            version: l.version.clone(),
        }
    }

    /// Decide a tool call (and the credential it asks for, if any).
    pub fn call(
        &self,
        who: &Principal,
        task: &TaskFacts,
        call: &CallFacts,
        workload_active: u64,
        now: Now,
    ) -> Decision {
        let l = self.current();
        if !task.declared_tools.iter().any(|t| t == &call.tool) {
            return self.deny(
                &l,
                &[],
                vec![format!("the task did not declare the tool `{}`", call.tool)],
            );
        }
        let tool =
            EntityUid::from_type_name_and_id(self.tool_type.clone(), EntityId::new(&call.tool));
        let risk = match l.entities.get(&tool).and_then(|e| e.attr("risk")) {
            Some(Ok(cedar_policy::EvalResult::Long(n))) => n,
            _ => 0,
        };
        let bg = call.break_glass.is_some();
        let requested_ttl = call.credential.as_ref().map_or(0, |c| c.requested_ttl);
        let e = self.eval(&l, &who.id, "Call", tool.clone(), |c| {
            who.put(c);
            task.put(c);
            c.put("action", || string(&call.action));
            c.put("target", || string(&call.target));
            c.put("arguments_sha256", || string(&call.arguments_sha256));
            c.put("requested_ttl", || long(requested_ttl));
            c.put("risk", || RestrictedExpression::new_long(risk));
            c.put("break_glass", || RestrictedExpression::new_bool(bg));
            c.put("workload_active_leases", || long(workload_active));
            c.put("delegation", || task.delegation(&who.id));
            now.put(c);
        });
        if !e.allowed {
            let reasons = self.denial(&l, &e, &format!("calling `{}`", call.tool));
            return self.deny(&l, &e.policies, reasons);
        }
        let mut counted: Vec<PolicyId> = e.policies.clone();
        if let Some(justification) = &call.break_glass {
            let g = self.eval(&l, &who.id, "BreakGlass", tool, |c| {
                who.put(c);
                task.put(c);
                c.put("action", || string(&call.action));
                c.put("target", || string(&call.target));
                c.put("justification", || string(justification));
                now.put(c);
            });
            if !g.allowed {
                let mut reasons = self.denial(&l, &g, &format!("break-glass on `{}`", call.tool));
                reasons.insert(0, "break-glass is not permitted here".into());
                return self.deny(&l, &g.policies, reasons);
            }
            counted.extend(g.policies);
        } else {
            counted.retain(|p| {
                l.meta
                    .get(p)
                    .is_none_or(|m| !m.obligations.break_glass_only)
            });
            if counted.is_empty() {
                return self.deny(
                    &l,
                    &e.policies,
                    vec![format!(
                        "`{}` is reachable only through break-glass",
                        call.tool
                    )],
                );
            }
        }
        if let Some(c) = &call.credential {
            let d = self.lease_eval(
                &l,
                who,
                task,
                c,
                &call.tool,
                &call.target,
                bg,
                workload_active,
                now,
            );
            match d {
                Ok(permits) => counted.extend(permits),
                Err(deny) => return deny,
            }
        }
        self.permit(&l, &counted, bg)
    }

    #[allow(clippy::too_many_arguments)]
    fn lease_eval(
        &self,
        l: &Loaded,
        who: &Principal,
        task: &TaskFacts,
        c: &LeaseFacts,
        tool: &str,
        target: &str,
        bg: bool,
        workload_active: u64,
        now: Now,
    ) -> Result<Vec<PolicyId>, Decision> {
        let name = format!("{}/{}", c.provider, c.role);
        if !l.roles.contains(&name) {
            return Err(self.deny(l, &[], vec![format!("no provider role `{name}`")]));
        }
        let resource =
            EntityUid::from_type_name_and_id(self.role_type.clone(), EntityId::new(&name));
        let e = self.eval(l, &who.id, "Lease", resource, |x| {
            who.put(x);
            task.put(x);
            x.put("tool", || string(tool));
            x.put("target", || string(target));
            x.put("scope", || strings(&c.scope));
            x.put("requested_ttl", || long(c.requested_ttl));
            x.put("break_glass", || RestrictedExpression::new_bool(bg));
            x.put("workload_active_leases", || long(workload_active));
            x.put("delegation", || task.delegation(&who.id));
            now.put(x);
        });
        if !e.allowed {
            let reasons = self.denial(l, &e, &format!("a `{name}` credential"));
            return Err(self.deny(l, &e.policies, reasons));
        }
        Ok(e.policies)
    }

    /// Decide a direct credential request (no tool call).
    pub fn lease(
        &self,
        who: &Principal,
        task: &TaskFacts,
        c: &LeaseFacts,
        workload_active: u64,
        now: Now,
    ) -> Decision {
        let l = self.current();
        match self.lease_eval(&l, who, task, c, "", "", false, workload_active, now) {
            Ok(permits) => self.permit(&l, &permits, false),
            Err(deny) => deny,
        }
    }
}

#[cfg(test)]
mod tests;
