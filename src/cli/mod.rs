//! Command-line interface: the server verbs and the client verbs that talk
//! to a running broker.

pub mod client;
pub mod conformance;
pub mod events;
pub mod incident;
pub mod table;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// leasehold: just-in-time, task-scoped credentials for AI-assistant workloads.
///
/// An assistant authenticates as a workload, opens a task (purpose, the user
/// it acts for, the prompt, a deadline), and leases credentials for that task
/// only. Every lease dies with its task or its TTL, whichever comes first.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker from a configuration file.
    Serve {
        /// The TOML configuration (see config/leasehold.example.toml).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Run a development broker: loopback, embedded store, token provider,
    /// dev identities. Writes dev-credentials.json in the data folder.
    Dev {
        /// Loopback address to listen on.
        #[arg(long, default_value = crate::dev::DEFAULT_LISTEN, value_name = "ADDR")]
        listen: SocketAddr,
        /// Folder for the store, its key, signing keys and credentials.
        #[arg(long, default_value = crate::dev::DEFAULT_DATA_DIR, value_name = "DIR")]
        data: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Run the egress proxy: assistants send HTTP(S) through it with their
    /// task's proxy credential; each request to a routed destination is a
    /// broker call, and leaves with a leased credential injected that the
    /// assistant never sees. See README, "Credentials an assistant never
    /// sees".
    Proxy {
        /// The proxy's configuration (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Check the configuration (and the CA, the broker token file) and exit.
        #[arg(long)]
        check: bool,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Check configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Work on a stopped broker's store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Write the OpenAPI 3.1 document of the HTTP API (the one a running
    /// broker serves at /v1/openapi.json).
    Openapi {
        /// Write to this file instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
    /// Create keys and operator tokens for a `serve` deployment.
    Keygen {
        #[command(subcommand)]
        command: KeygenCommand,
    },
    /// Open, show and complete tasks (as a workload).
    Task {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Request, show, revoke and list leases.
    Lease {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Approve or deny calls that policy held back (approver).
    Approvals {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Break-glass reviews awaiting an approver's sign-off.
    Reviews {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: ReviewsCommand,
    },
    /// The policy set in force; reload it (admin).
    Policy {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Read, export, verify and archive the event chain.
    Events {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Mass-revoke leases by selector, optionally fencing (responder).
    ///
    /// Starts a durable job in the broker and follows it with a progress
    /// line (counts per provider, rate, ETA). Exits 1 if any lease ended
    /// irrevocable, so scripts notice; `revoke status JOB` shows a job later.
    ///
    /// Example: leasehold revoke --workload assistant-a --fence --reason "token leaked"
    #[command(args_conflicts_with_subcommands = true)]
    Revoke {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: Option<RevokeCommand>,
        #[command(flatten)]
        selector: RevokeSelector,
    },
    /// Provider maintenance (admin, responder).
    Providers {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: ProvidersCommand,
    },
    /// Fences: who gets nothing new (responder).
    Fence {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: FenceCommand,
    },
    /// The broker at a glance (admin, responder): health, readiness, the
    /// leader, leases by provider and state, the revocation queue, the
    /// last checkpoint's age.
    Status {
        #[command(flatten)]
        conn: Connection,
    },
    /// Every task, call, decision and lease of a workload in a window, and
    /// which leases are still live (responder, admin).
    BlastRadius {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        workload: String,
        /// RFC 3339 (default: 24 hours ago).
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339 (default: now).
        #[arg(long)]
        until: Option<String>,
    },
}

/// What `leasehold revoke` takes back: every given selector must match.
#[derive(Debug, Args, Default)]
pub struct RevokeSelector {
    /// Leases of this workload (and, with --fence, fence it).
    #[arg(long)]
    pub workload: Option<String>,
    /// Leases of this tenant's workloads (and, with --fence, fence it).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Leases of this task (task_...).
    #[arg(long)]
    pub task: Option<String>,
    /// Leases whose tasks act for this user (and, with --fence, fence the user).
    #[arg(long)]
    pub user: Option<String>,
    /// Leases from this provider.
    #[arg(long)]
    pub provider: Option<String>,
    /// Leases of this provider role.
    #[arg(long)]
    pub role: Option<String>,
    /// `active` or `irrevocable` (repeatable; default both).
    #[arg(long = "state", value_name = "STATE")]
    pub states: Vec<String>,
    /// Leases issued at or after this time (RFC 3339).
    #[arg(long)]
    pub issued_after: Option<String>,
    /// Leases issued before this time (RFC 3339).
    #[arg(long)]
    pub issued_before: Option<String>,
    /// Everything (an empty selector is refused without it).
    #[arg(long)]
    pub all: bool,
    /// Why (required; recorded in the event chain).
    #[arg(long)]
    pub reason: Option<String>,
    /// Also fence the selected workload, tenant or user: nothing new is
    /// issued to it until a responder lifts the fence.
    #[arg(long)]
    pub fence: bool,
    /// Count what would be revoked, per provider, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Start the job and print it without following it.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// A job's counts per provider and the leases still failing.
    Status {
        job_id: String,
        /// Follow it with the progress line until it finishes.
        #[arg(long)]
        follow: bool,
    },
    /// Every job.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ProvidersCommand {
    /// List what a provider's peer holds with the broker's mark (PostgreSQL:
    /// roles with the configured prefix) that no live lease accounts for,
    /// and with --drop remove it. Never touches anything without the mark.
    /// Recorded in the event chain.
    ///
    /// Example: leasehold providers reconcile appdb --drop
    Reconcile {
        /// The provider's name in the config.
        #[arg(value_name = "PROVIDER")]
        name: String,
        /// Remove the orphans found (default: report only).
        #[arg(long)]
        drop: bool,
    },
    /// Run the conformance suite against one configured provider or plugin,
    /// in this process (no broker needed): issue, use, revoke, check it is
    /// unusable, revoke again, roll back by lease id, revoke in a batch.
    /// Each promise prints as passed or failed; exit 1 if any failed. It
    /// mints and revokes real credentials at the provider's peer, and uses
    /// the provider's own probe to check each one works, then does not.
    ///
    /// Example: leasehold providers conformance --config leasehold.toml mariadb
    Conformance {
        /// The broker's configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The provider's name in the config.
        #[arg(value_name = "PROVIDER")]
        name: String,
        /// Only this role (repeatable; default: every role).
        #[arg(long, value_name = "ROLE")]
        role: Vec<String>,
        /// The provider's credentials cannot be revoked, only outlived: run
        /// the expiry-only suite (waits for a credential to die).
        #[arg(long)]
        expiry_only: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FenceCommand {
    /// Fences in force.
    List,
    /// Lift a fence (give exactly one of --workload, --tenant, --user).
    Lift {
        #[arg(long, group = "target")]
        workload: Option<String>,
        #[arg(long, group = "target")]
        tenant: Option<String>,
        #[arg(long, group = "target")]
        user: Option<String>,
        /// Why (required; recorded in the event chain).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending approval requests.
    List,
    /// One approval; `--wait` long-polls for a decision.
    Show {
        approval_id: String,
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    Approve {
        approval_id: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Deny (a comment saying why is required).
    Deny {
        approval_id: String,
        #[arg(long)]
        comment: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReviewsCommand {
    List,
    SignOff {
        task_id: String,
        #[arg(long)]
        comment: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    Show,
    /// Reload the policy folder; a bad set is refused with file and line.
    Reload,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// One page of events, filtered (admin, responder).
    List {
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        lease: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        /// The user acted for (matched through the HMAC if configured).
        #[arg(long)]
        user: Option<String>,
        /// e.g. lease.issued, lease.revoked, task.opened
        #[arg(long)]
        kind: Option<String>,
        /// RFC 3339
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Continue after this seq (the previous page's next_cursor).
        #[arg(long)]
        after: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// A task's story in order, for people: prompt, leases, revocations.
    Show {
        #[arg(long)]
        task: String,
    },
    /// JSON Lines for a SIEM: header, checkpoints, one event per line.
    Export {
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Start after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep following the chain as it grows.
        #[arg(long)]
        follow: bool,
    },
    /// Verify the chain and its checkpoints: online (default), or offline
    /// from a stopped broker's store file or an export. Exits 1 and names
    /// the first broken link if it does not verify.
    Verify {
        #[arg(long, value_name = "FILE", conflicts_with = "export")]
        store: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// The trusted checkpoint key (its PKCS#8 file or the public key
        /// `leasehold keygen checkpoint` printed).
        #[arg(long, value_name = "FILE")]
        checkpoint_key: Option<PathBuf>,
    },
    /// Archive and prune the oldest events through SEQ (admin): the broker
    /// writes them to a file in its `audit.archive_dir`, verifies it, and
    /// only then removes them, recording the file's name and SHA-256 on the
    /// chain. Events younger than `audit.prune_min_age_seconds` (7 days by
    /// default) are never removed.
    Archive {
        #[arg(long, value_name = "SEQ")]
        through: u64,
        /// Also keep a copy here (read through the API before the prune).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a stopped broker's store into a new, empty store, between redb
    /// and PostgreSQL either way, then verify the chain on the target.
    ///
    /// Both configurations must name the same store key (records stay
    /// sealed with it). The target must be empty; no broker may be running
    /// on either store. Prints what was copied and the verification, as
    /// JSON; exits 1 if the target's chain does not verify.
    ///
    /// Example: leasehold store copy --from redb.toml --to postgres.toml
    Copy {
        /// The configuration of the store to copy.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The configuration of the new store.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and validate a configuration, and check every file it names;
    /// exactly the checks `serve` runs before it binds. With the store in
    /// PostgreSQL, reach it and check (reading only) what a start would
    /// refuse: credentials, TLS, privileges, a newer schema, another store
    /// key. Then, where the database is reachable, dry-run every PostgreSQL
    /// provider's role template in a transaction that is rolled back (an
    /// unreachable provider database is a note, not a failure: the health
    /// check runs the same dry run).
    Validate {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Skip the dry runs against provider peers.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeygenCommand {
    /// A new 256-bit store key, written as hex to FILE (mode 0600; never
    /// overwrites).
    Store {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// A new Ed25519 signing key for the token provider (PKCS#8, mode 0600).
    Token {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// A new operator bearer token: prints the token (give it to the
    /// operator) and its SHA-256 (put it in config).
    Operator,
    /// A new Ed25519 key for signing event-chain checkpoints (PKCS#8, mode
    /// 0600); prints its public key for offline verification.
    Checkpoint {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// How client verbs reach the broker and who they are.
#[derive(Debug, Args)]
pub struct Connection {
    /// Broker base URL; defaults to the dev broker named in the credentials file.
    #[arg(long, env = "LEASEHOLD_BROKER", global = true, value_name = "URL")]
    pub broker: Option<String>,
    /// Bearer token (workload JWT or operator token).
    #[arg(
        long,
        env = "LEASEHOLD_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Act as a named identity from the dev credentials file
    /// (assistant-a, assistant-b, admin, approver, responder, resource-server).
    #[arg(long = "as", env = "LEASEHOLD_AS", global = true, value_name = "NAME")]
    pub identity: Option<String>,
    /// The dev credentials file `leasehold dev` wrote.
    #[arg(
        long,
        env = "LEASEHOLD_CREDENTIALS",
        global = true,
        default_value = "leasehold-data/dev-credentials.json",
        value_name = "FILE"
    )]
    pub credentials: PathBuf,
    /// Extra CA certificate (PEM) to trust, for brokers with a private CA.
    #[arg(long, env = "LEASEHOLD_CA_FILE", global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// `table` for people, `json` for scripts (the default: a table on a
    /// terminal, JSON when piped).
    #[arg(short = 'o', long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<table::Output>,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Open a task; prints it, with its task_id.
    Open {
        /// Why the assistant needs access.
        #[arg(long)]
        purpose: String,
        /// The user the assistant acts for.
        #[arg(long)]
        on_behalf_of: String,
        /// The prompt (only its SHA-256 is kept unless the broker is
        /// configured to keep prompt text).
        #[arg(long, conflicts_with = "prompt_sha256")]
        prompt: Option<String>,
        /// The SHA-256 of the prompt, hex, instead of the prompt.
        #[arg(long)]
        prompt_sha256: Option<String>,
        /// A tool the task may call (repeatable).
        #[arg(long = "tool", value_name = "TOOL")]
        tools: Vec<String>,
        /// Hard deadline, in seconds from now.
        #[arg(long = "ttl", value_name = "SECONDS")]
        ttl_seconds: i64,
    },
    /// Show a task and its leases.
    Show { task_id: String },
    /// Complete a task: revokes every lease under it.
    Complete { task_id: String },
    /// A credential for `leasehold proxy`, bound to the task and ending
    /// with it (use it as the password of the proxy URL).
    ProxyCredential {
        task_id: String,
        /// End it sooner than the task.
        #[arg(long = "ttl", value_name = "SECONDS")]
        ttl_seconds: Option<u64>,
    },
    /// Ask for one tool call to be decided (and a credential for it).
    Call {
        task_id: String,
        #[arg(long)]
        tool: String,
        /// What the tool is asked to do.
        #[arg(long)]
        action: String,
        /// What it acts on.
        #[arg(long, default_value = "")]
        resource: String,
        #[arg(long, default_value = "")]
        arguments_sha256: String,
        /// Ask for a credential from this provider...
        #[arg(long, requires_all = ["role", "ttl_seconds"])]
        provider: Option<String>,
        /// ...with this role...
        #[arg(long)]
        role: Option<String>,
        /// ...for this long.
        #[arg(long = "ttl", value_name = "SECONDS")]
        ttl_seconds: Option<i64>,
        #[arg(long = "scope", value_name = "SCOPE")]
        scope: Vec<String>,
        /// Retry of a call that needed approval, once approved.
        #[arg(long)]
        approval: Option<String>,
        /// Break-glass, with the justification (loud: reviewed afterwards).
        #[arg(long, value_name = "JUSTIFICATION")]
        break_glass: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Request a credential under a task; prints the lease and credential.
    Request {
        task_id: String,
        #[arg(long)]
        provider: String,
        #[arg(long)]
        role: String,
        #[arg(long = "ttl", value_name = "SECONDS")]
        ttl_seconds: i64,
        /// Narrow the credential (repeatable), within what the role allows.
        #[arg(long = "scope", value_name = "SCOPE")]
        scope: Vec<String>,
    },
    /// Show a lease (never its credential).
    Show { lease_id: String },
    /// Revoke a lease now (idempotent); an irrevocable lease is retried.
    /// With --force and --reason, give up on an irrevocable lease: it is
    /// marked abandoned (recorded in the event chain, never silent).
    Revoke {
        lease_id: String,
        #[arg(long, requires = "reason")]
        force: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List leases (admin, responder).
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        cursor: Option<String>,
    },
}
