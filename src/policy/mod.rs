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

mod context;
mod load;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, EntityId, EntityTypeName, EntityUid, PolicyId,
    Request, RestrictedExpression,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use context::Now;
use context::*;
use load::*;
pub use load::{LoadError, Loaded};

/// What a permit policy obliges, from its annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Obligations {
    pub approval: bool,
    pub max_ttl: Option<u64>,
    pub break_glass_only: bool,
}

/// A provider role the broker offers, made into a `ProviderRole` entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleEntity {
    pub provider: String,
    pub role: String,
    pub max_ttl: u64,
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

    /// Whether a decision may read `context.workload_active_leases` (any
    /// policy in force reads it, or decisions are not sliced).
    pub fn reads_workload_active(&self) -> bool {
        !self.slicing || self.current().reads_workload_active
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
    /// How the credential will be bound to the workload's key: `dpop`,
    /// `mtls`, or `None` for a bearer credential.
    pub binding: Option<&'static str>,
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
            x.put("bound", || {
                RestrictedExpression::new_bool(c.binding.is_some())
            });
            x.put("binding", || string(c.binding.unwrap_or("none")));
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
