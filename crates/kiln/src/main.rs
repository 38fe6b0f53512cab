//! The `kiln` binary: argument parsing and wiring. The work is done by
//! `kiln-store` (store, bake, unpack) on types from `kiln-core`; this crate
//! turns its results into output and exit codes.
//!
//! Exit codes: 0 success; 1 the command failed (the message says why);
//! 2 the command line was invalid.

mod access;
mod audit;
mod client;
mod commands;
mod demo;
mod deploy;
mod progress;
mod pull;
mod registry;
mod remote;
mod trust;
mod why;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kiln: immutable infrastructure in one binary.
///
/// Bake an application into a content-addressed OCI image (same inputs, same
/// digest), keep it in a local store, and run it by replacing instances.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, propagate_version = true)]
pub struct Cli {
    /// The store and state directory [default: $KILN_HOME, else $XDG_DATA_HOME/kiln, else ~/.local/share/kiln]
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,

    /// Send the command to a remote agent (https://HOST:PORT, after `kiln
    /// login` there); KILN_TOKEN gives its token, KILN_AGENT_FINGERPRINT its
    /// certificate's fingerprint when it was never logged in to
    #[arg(long, global = true, value_name = "URL", env = "KILN_AGENT")]
    agent: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    /// Only this service's entries
    #[arg(value_name = "SERVICE")]
    service: Option<String>,
    /// Only entries since this long ago (1h, 2d) or this time (RFC 3339)
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Only entries of this kind (release-created, rollback, token-created, …)
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// One JSON object per entry
    #[arg(long)]
    json: bool,
    /// Keep printing entries as they are added
    #[arg(short = 'f', long)]
    follow: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Write the ledger and its signed checkpoints to FILE (JSON Lines)
    Export {
        /// Where to write (replaced whole, never half-written)
        file: PathBuf,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Check the ledger (the agent's, or an export) with only its entries,
    /// checkpoints and the node's public key: exits 1 naming the first bad
    /// entry (edited, deleted, inserted, reordered, or cut off)
    Verify {
        /// An export (kiln audit export); default: the agent's ledger
        file: Option<PathBuf>,
        /// The node's public key (its $KILN_HOME/node.pub); a cluster's
        /// ledger: once per node [default: this home's, or for the agent's
        /// own ledger the keys its state store lists]
        #[arg(long, value_name = "PUB")]
        key: Vec<PathBuf>,
        /// Also prove that this older export is a prefix of the ledger
        #[arg(long, value_name = "OLD")]
        since_checkpoint: Option<PathBuf>,
        /// Accept entries at the end that no checkpoint covers, however
        /// many or old (an agent that died before signing); by default more
        /// than 100, or older than a minute when the ledger was read, fail
        #[arg(long)]
        allow_unsigned_tail: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Make an ed25519 signing key: $KILN_HOME/keys/NAME (0600) and NAME.pub
    Generate {
        /// The key's name [default: default]
        #[arg(default_value = "default")]
        name: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// The signing keys in $KILN_HOME/keys and their fingerprints
    List {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a token and print it (once: only its hash is kept)
    Create {
        /// 1 to 32 of a-z, 0-9, - and _ (events name changes by it)
        name: String,
        /// viewer (reads), deployer (also apply, rollback, promote, abort,
        /// remove, image uploads) or admin (also tokens and gc)
        #[arg(long, value_parser = |s: &str| s.parse::<kiln_core::auth::Role>())]
        role: kiln_core::auth::Role,
        /// Expire after this long (e.g. 30d, 12h) [default: never]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<std::time::Duration>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Every token's name, role, creation and expiry (never a token)
    List {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// A token no longer authenticates, from its next request on
    Revoke {
        /// The token's name (as `kiln token list` shows it)
        name: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

// Parsed once per run: `serve`'s many flags make it the largest variant,
// and boxing them would only make clap's derive harder to read.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Bake images from the spec into the store and print their digests
    Bake {
        /// The spec file
        #[arg(
            short = 'f',
            long = "file",
            default_value = "kiln.toml",
            value_name = "FILE"
        )]
        file: PathBuf,
        /// Images to bake (default: every `[images.NAME]` of the spec)
        #[arg(value_name = "IMAGE")]
        images: Vec<String>,
        /// An extra immutable tag for each baked image (repeatable)
        #[arg(short, long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Sign each baked image with this key (as `kiln sign --key`)
        #[arg(long, value_name = "KEY")]
        sign: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the images in the store
    Images {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show an image: manifest, config, layers, files and provenance
    Inspect {
        /// NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix
        #[arg(value_name = "REF")]
        reference: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every blob (or one image's) and check materialized trees;
    /// exits 1 naming each corrupt object
    Verify {
        /// Only this image: NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix
        #[arg(value_name = "REF")]
        reference: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Export an image as an OCI layout or a docker archive
    #[command(group = clap::ArgGroup::new("format").required(true))]
    Export {
        /// The image: NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix
        #[arg(value_name = "REF")]
        reference: String,
        /// Write (or add to) an OCI image layout directory
        #[arg(long, value_name = "DIR", group = "format")]
        oci: Option<PathBuf>,
        /// Write a tarball that `docker load` accepts
        #[arg(long = "docker-archive", value_name = "FILE", group = "format")]
        docker_archive: Option<PathBuf>,
        /// The tag to give it there [default: the tag in REF, else the automatic one]
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove what no kept image needs from the store: blobs, trees, tmp/ leftovers
    Gc {
        /// Say what would go, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Releases of each service whose images are kept (with whatever
        /// runs or is being rolled out)
        #[arg(long, value_name = "N", default_value_t = kiln_core::retention::KEEP_RELEASES)]
        keep_releases: usize,
        /// Anything younger stays (a bake or pull in progress)
        #[arg(long, value_name = "DURATION", default_value = GC_GRACE, value_parser = parse_duration)]
        grace: std::time::Duration,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Push an image to an OCI registry (only the blobs it lacks)
    Push {
        /// The image: NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix
        #[arg(value_name = "REF")]
        reference: String,
        /// HOST[:PORT]/REPO[:TAG] [default tag: the one in REF, else latest];
        /// without it, to the agent --agent names (through its API)
        #[arg(value_name = "DEST")]
        dest: Option<String>,
        /// Plain HTTP to this registry (never chosen on its own)
        #[arg(long)]
        insecure: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from an OCI registry into the store (verified as it streams)
    Pull {
        /// HOST[:PORT]/REPO:TAG or HOST[:PORT]/REPO@sha256:HEX
        #[arg(value_name = "SRC")]
        src: String,
        /// Plain HTTP to this registry (never chosen on its own)
        #[arg(long)]
        insecure: bool,
        /// Give up (keeping nothing) when the whole pull takes longer than
        /// this
        #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = parse_duration)]
        timeout: std::time::Duration,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Keep credentials for a registry ($KILN_HOME/registries.json, 0600), or
    /// for a remote agent (https://HOST:PORT: its token, and its certificate's
    /// fingerprint pinned on first use, in $KILN_HOME/agents.json, 0600)
    Login {
        /// HOST[:PORT] of the registry, or https://HOST:PORT of an agent
        #[arg(value_name = "HOST")]
        host: String,
        /// An agent's token, read from stdin (else from KILN_TOKEN)
        #[arg(long)]
        token_stdin: bool,
        /// Print the result as JSON (agents)
        #[arg(long)]
        json: bool,
        /// The user name
        #[arg(short, long, value_name = "USER")]
        username: Option<String>,
        /// Read the password from stdin (it is never taken on the command line)
        #[arg(long)]
        password_stdin: bool,
        /// The registry speaks plain HTTP (remembered for push, pull and apply)
        #[arg(long)]
        insecure: bool,
    },
    /// Forget a registry's credentials, or an agent's token and pin
    Logout {
        /// HOST[:PORT] of the registry, or https://HOST:PORT of an agent
        #[arg(value_name = "HOST")]
        host: String,
    },
    /// Unpack an image's root filesystem into DIR (which must not exist or
    /// be empty); without DIR, materialize its read-only tree in the store
    Unpack {
        /// The image: NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix
        #[arg(value_name = "REF")]
        reference: String,
        /// Where to unpack (must not exist or be empty)
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// API tokens for remote use: create, list, revoke (admin)
    #[command(subcommand)]
    Token(TokenCommand),
    /// Signing keys for images (SSH ed25519): generate, list
    #[command(subcommand)]
    Key(KeyCommand),
    /// Sign an image (an SSH signature over its digest, namespace kiln, kept
    /// with it as an OCI referrer; ssh-keygen -Y verify checks it)
    Sign {
        /// The image: NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix
        #[arg(value_name = "REF")]
        reference: String,
        /// A key of $KILN_HOME/keys, or the path of an OpenSSH ed25519 key
        #[arg(long, default_value = "default", value_name = "NAME")]
        key: String,
        /// Also write the signature (PEM) to FILE
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// The signatures on an image, each checked against its digest
    Signatures {
        /// The image: NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix
        #[arg(value_name = "REF")]
        reference: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Why this runs: from an instance, the PID of any process inside one, or
    /// a service, to its release, image, bake, source commit, signatures and
    /// ledger entries, each checked
    Why {
        /// An instance id, a PID, or a service
        #[arg(value_name = "TARGET")]
        target: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// The ledger: who changed what and when (every event, hash-chained and
    /// signed); export it, verify it
    Audit(AuditArgs),
    /// Run the agent on this node (foreground): reconciler, instances, router, API on $KILN_HOME/kiln.sock
    ///
    /// A small supervisor holds the sockets and starts the agent process; if
    /// the agent dies another takes over its instances and sockets at once.
    /// SIGTERM stops everything; SIGHUP (or `kiln serve --upgrade`) hands over
    /// to a new agent started from the binary now on disk.
    Serve {
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9090), at /metrics
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Upgrade (or restart) the running kiln serve of $KILN_HOME: a new agent from
        /// the binary now on disk takes over; no instance stops, no request fails
        #[arg(long, conflicts_with = "metrics")]
        upgrade: bool,
        /// Collect the store (as `kiln gc` does) whenever its blobs pass
        /// this size (e.g. 20G, 500M, or bytes)
        #[arg(long, value_name = "SIZE", value_parser = kiln_core::spec::parse_size)]
        gc_above: Option<u64>,
        /// Releases of each service whose images a collection keeps (with
        /// whatever runs), so that `kiln rollback --to N` works for them
        #[arg(long, value_name = "N", default_value_t = kiln_core::retention::KEEP_RELEASES)]
        keep_releases: usize,
        /// With --gc-above: anything younger stays (a bake or pull in progress)
        #[arg(long, value_name = "DURATION", default_value = GC_GRACE, value_parser = parse_duration)]
        gc_grace: std::time::Duration,
        /// Serve the API over TLS on this address too (e.g. 0.0.0.0:7443):
        /// remote commands, images and the dashboard, behind API tokens
        #[arg(long, value_name = "ADDR")]
        api: Option<std::net::SocketAddr>,
        /// With --api: the certificate (PEM chain) to serve, instead of the
        /// self-signed one made on first start in $KILN_HOME/api/
        #[arg(long, value_name = "FILE", requires = "tls_key", requires = "api")]
        tls_cert: Option<PathBuf>,
        /// With --tls-cert: its private key (PEM)
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Sign the ledger's head at least this often while events are added
        /// (also every 100 entries, and when the agent stops)
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
        checkpoint_every: std::time::Duration,
        /// Verify every image tree in full this often (and once at start),
        /// besides watching them: what a watch can miss (a change made while
        /// no agent ran) is found then
        #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
        verify_every: std::time::Duration,
        /// How fast the full verification may read, per second (e.g. 64M;
        /// 0: as fast as the disk goes), so it never starves the instances
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = kiln_core::spec::parse_size)]
        verify_rate: u64,
        /// Let services use a runtime that is off by default: `process`
        /// runs the app as a plain, unconfined process (no read-only root,
        /// no namespaces, no seccomp)
        #[arg(long, value_name = "RUNTIME", value_parser = ["process"])]
        allow_runtime: Vec<String>,
        /// The trust policy this agent enforces on every apply and
        /// rollback: a TOML file with a `[trust]` table (`allowed_signers`,
        /// `require_signed`), as in a spec; signatures are verified by the
        /// agent from its own store
        #[arg(long, value_name = "FILE")]
        trust: Option<PathBuf>,
        /// Keep the cluster's state (services, releases, rollouts, the
        /// ledger, tokens, secrets) in etcd at this client URL (e.g.
        /// http://127.0.0.1:2379; repeat for each member) instead of
        /// $KILN_HOME/state.db, which keeps only this node's instances
        #[arg(long, value_name = "URL", value_parser = parse_etcd_url)]
        etcd: Vec<String>,
        /// With --etcd: the key prefix of this cluster's state
        #[arg(long, value_name = "PREFIX", requires = "etcd", default_value = kiln_agent::ETCD_PREFIX, value_parser = parse_etcd_prefix)]
        etcd_prefix: String,
        /// With --etcd: this node's name in the cluster (default: the host name)
        #[arg(long, value_name = "NAME", requires = "etcd", value_parser = parse_node_name)]
        node: Option<String>,
        /// With --etcd: this node's address, where the other nodes' routers
        /// reach its instances and where a `listen = ":PORT"` binds
        /// (default: 127.0.0.1, a cluster on one machine)
        #[arg(long, value_name = "IP", requires = "etcd", value_parser = parse_advertise)]
        advertise: Option<std::net::IpAddr>,
        /// With https:// etcd URLs: the CA that signed etcd's certificate (PEM)
        #[arg(long, value_name = "FILE", requires = "etcd")]
        etcd_ca: Option<PathBuf>,
        /// With --etcd-ca: this node's client certificate for etcd's
        /// `--client-cert-auth` (PEM), with --etcd-key
        #[arg(long, value_name = "FILE", requires_all = ["etcd_ca", "etcd_key"])]
        etcd_cert: Option<PathBuf>,
        /// The client certificate's private key (PEM)
        #[arg(long, value_name = "FILE", requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        /// With --etcd: a label of this node (repeat for each); a service's
        /// `node_labels` runs only on nodes that have them all
        #[arg(long = "label", value_name = "KEY=VALUE", requires = "etcd", value_parser = kiln_core::cluster::parse_label)]
        labels: Vec<(String, String)>,
        /// The CPUs this node offers its instances (default: the host's);
        /// instances of services that declare `cpu` are placed within it
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
        cpus: Option<u32>,
        /// The memory this node offers its instances, e.g. 8G (default: the
        /// host's); instances of services that declare `memory` are placed
        /// within it
        #[arg(long, value_name = "SIZE", value_parser = parse_offered_memory)]
        memory: Option<u64>,
        /// (internal) run as the agent process under a supervisor
        #[arg(long, hide = true)]
        run_agent: bool,
        /// (internal) the agent replaces a running one
        #[arg(long, hide = true, requires = "run_agent")]
        successor: bool,
    },
    /// Bake what changed, record a release per changed service, and roll it out
    Apply {
        /// The spec file
        #[arg(
            short = 'f',
            long = "file",
            default_value = "kiln.toml",
            value_name = "FILE"
        )]
        file: PathBuf,
        /// Return once the releases are recorded, without waiting for the rollout
        #[arg(long, conflicts_with = "wait")]
        detach: bool,
        /// Wait through the rollout's manual pauses (`kiln promote` from
        /// elsewhere) and its watch (`rollout.watch`), until the release is
        /// settled; without it apply returns (exit 0) at a pause that waits
        /// for `kiln promote`, saying so
        #[arg(long)]
        wait: bool,
        /// Remove the services the agent runs that the spec no longer has
        /// (their instances stop gracefully; their history is kept)
        #[arg(long)]
        prune: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Check a spec offline (no agent, nothing baked): its syntax and keys
    /// (file:line:column, the nearest valid key for a misspelt one), every
    /// image's context, the `[trust]` keys; exits 1 naming the first
    /// problem. For CI, before anything runs
    Check {
        /// The spec file
        #[arg(
            short = 'f',
            long = "file",
            default_value = "kiln.toml",
            value_name = "FILE"
        )]
        file: PathBuf,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show what `kiln apply` would do, without doing it
    Plan {
        /// The spec file
        #[arg(
            short = 'f',
            long = "file",
            default_value = "kiln.toml",
            value_name = "FILE"
        )]
        file: PathBuf,
        /// Plan as `kiln apply --prune` would: services not in the spec are removed
        #[arg(long)]
        prune: bool,
        /// Exit 2 when what runs differs from the spec (a change to apply, or
        /// a service running that the spec does not have), 0 when it does
        /// not: for cron and CI
        #[arg(long)]
        exit_code: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove a service: its instances stop gracefully (out of the routes,
    /// drained, stop signal), its listener closes; its history is kept
    Remove {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Services, their releases and instances
    Status {
        /// Only this service
        #[arg(value_name = "SERVICE")]
        service: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Drift: what the agent watches, its last full verification of the
    /// image trees, and what it found (files changed in a tree, instances
    /// whose command line or environment changed) and replaced
    Drift {
        /// Only findings that affected this service
        #[arg(value_name = "SERVICE")]
        service: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// The cluster's nodes: name, leader, instances assigned, version, when
    /// it joined (on its own, this node alone)
    Nodes {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Move every instance off a node of the cluster (each replaced on
    /// another node before it stops: no failed request) and place nothing
    /// new there until `kiln undrain`; waits until the node runs none
    Drain {
        /// The node's name (`kiln nodes`)
        node: String,
        /// Return once the drain is recorded, without waiting
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the node to be empty
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Let a drained node take new instances again (nothing moves back by
    /// itself: new instances, replacements and rollouts go there)
    Undrain {
        /// The node's name
        node: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// A service's releases: revision, image, created, cause, outcome
    History {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a one-off instance of a service's release (its
    /// sandbox, env, secrets, volumes, user, limits): output streamed, its
    /// exit status returned, recorded in the ledger
    Run {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// The release to run [default: the active one]
        #[arg(long, value_name = "REVISION")]
        release: Option<u64>,
        /// Pass this command's standard input to it (no terminal: a shell
        /// reads its commands from it)
        #[arg(short, long)]
        interactive: bool,
        /// The command and its arguments, after `--`
        #[arg(value_name = "CMD", last = true, required = true)]
        argv: Vec<String>,
    },
    /// Break glass: run a command inside a running instance (its namespaces,
    /// user and env), recorded in the ledger; the instance is then replaced
    /// from its image unless an admin says --keep
    Exec {
        /// The instance, as `kiln status` names it
        #[arg(value_name = "INSTANCE")]
        instance: String,
        /// Leave the instance running afterwards (an admin's)
        #[arg(long)]
        keep: bool,
        /// Pass this command's standard input to it
        #[arg(short, long)]
        interactive: bool,
        /// The command and its arguments, after `--`
        #[arg(value_name = "CMD", last = true, required = true)]
        argv: Vec<String>,
    },
    /// Return a service to an earlier release's content (a new release, rolled out)
    Rollback {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// The release to return to [default: the previous successful one]
        #[arg(long, value_name = "REVISION")]
        to: Option<u64>,
        /// Return once the rollback is recorded, without waiting for it
        #[arg(long)]
        detach: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Switch a blue-green rollout waiting for promotion (auto_promote = false),
    /// or pass a canary's current step (its pause, manual or not)
    Promote {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Hold a service's new requests at the router (they wait, up to
    /// --timeout, then 503) until `kiln resume`; kept across restarts
    Pause {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// How long a request waits before it is answered 503
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        timeout: std::time::Duration,
        /// Maintenance: answer every request 503 at once (with the
        /// service's 503 page, if it has one) instead of holding it
        #[arg(long, conflicts_with = "timeout")]
        maintenance: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Let a paused service's requests go on
    Resume {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop the rollout in progress: the service returns to the release
    /// before it (a canary: all traffic to stable in one swap, canary stopped)
    Abort {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Rollouts: `kiln rollout status SERVICE` follows one in progress
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Instance logs of a service (kept after instances are gone)
    Logs {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Only this release's instances
        #[arg(long, value_name = "N")]
        release: Option<u64>,
        /// Only this instance
        #[arg(long, value_name = "ID")]
        instance: Option<String>,
        /// Only the release tasks' output (pre_deploy, pre_rollback hooks)
        #[arg(long)]
        hook: bool,
        /// Keep following new output (first the last 100 lines of each
        /// instance, unless --tail or --since says otherwise)
        #[arg(short, long)]
        follow: bool,
        /// Only lines from this long ago (`10m`, `2h`) or this time on
        /// (RFC 3339)
        #[arg(long, value_name = "DURATION|TIME")]
        since: Option<String>,
        /// Only the last N lines of each instance
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// JSON Lines: {"instance": ID, "time": RFC 3339, "line": TEXT} per line
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `kiln completions bash >
    /// /etc/bash_completion.d/kiln`)
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print kiln's manual page, roff (e.g. `kiln man > /usr/local/share/man/man1/kiln.1`)
    Man,
    /// Show kiln at work on the example app, in a temporary home (or --home,
    /// which is kept): deploy, roll out under load, roll back; then serve
    /// until Ctrl-C
    Demo {
        /// Keep the temporary home afterwards and print its path
        #[arg(long)]
        keep: bool,
        /// Exit at the end instead of serving until Ctrl-C
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Follow the service's current rollout until it completes or fails
    Status {
        /// The service, as named in kiln.toml
        #[arg(value_name = "SERVICE")]
        service: String,
        /// Wait through manual pauses and the release's watch, until it is
        /// settled (without it: return at a pause that waits for `kiln
        /// promote`)
        #[arg(long)]
        wait: bool,
        /// No progress; at the end, the service's status as JSON
        #[arg(long)]
        json: bool,
    },
}

/// What a command works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// An agent: the remote one `--agent` names, else this home's.
    Agent,
    /// This machine's store (`--agent` is refused).
    Store,
    /// This machine, no store and no agent to choose (`serve`, `login` …).
    Local,
}

impl Command {
    /// Exhaustive: a new command must say what it works on.
    fn reach(&self) -> Reach {
        match self {
            Command::Bake { .. }
            | Command::Images { .. }
            | Command::Inspect { .. }
            | Command::Verify { .. }
            | Command::Push { dest: Some(_), .. }
            | Command::Pull { .. }
            | Command::Export { .. }
            | Command::Unpack { .. }
            | Command::Key(_)
            | Command::Sign { .. }
            | Command::Signatures { .. } => Reach::Store,
            Command::Serve { .. }
            | Command::Check { .. }
            | Command::Login { .. }
            | Command::Logout { .. }
            | Command::Demo { .. }
            | Command::Completions { .. }
            | Command::Man => Reach::Local,
            Command::Push { dest: None, .. }
            | Command::Gc { .. }
            | Command::Token(_)
            | Command::Why { .. }
            | Command::Audit(_)
            | Command::Apply { .. }
            | Command::Plan { .. }
            | Command::Remove { .. }
            | Command::Status { .. }
            | Command::Drift { .. }
            | Command::Nodes { .. }
            | Command::Drain { .. }
            | Command::Undrain { .. }
            | Command::History { .. }
            | Command::Rollback { .. }
            | Command::Run { .. }
            | Command::Exec { .. }
            | Command::Promote { .. }
            | Command::Pause { .. }
            | Command::Resume { .. }
            | Command::Abort { .. }
            | Command::Rollout { .. }
            | Command::Logs { .. } => Reach::Agent,
        }
    }
}

/// Dispatch a command to its module.
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let home = || commands::resolve_home(cli.home.clone());
    // Commands that talk to an agent talk to the remote one named; the
    // others (serve, login, the store's own commands) are about this machine.
    let reach = cli.command.reach();
    if let Some(url) = &cli.agent
        && reach == Reach::Agent
    {
        remote::choose(&home()?, url)?;
    }
    // The store's own commands read this machine's store: an explicit
    // `--agent` there would be silently ignored, so it is refused (a
    // `KILN_AGENT` in the environment, meant for the agent commands, is
    // not).
    if cli.agent.is_some() && explicit_agent_flag() && reach == Reach::Store {
        anyhow::bail!(
            "--agent does not apply to this command: it works on this machine's store ({}); run it on the agent's machine, or push the image there",
            home()?.display()
        );
    }
    match cli.command {
        Command::Bake {
            file,
            images,
            tags,
            sign,
            json,
        } => commands::bake(&home()?, &file, &images, &tags, sign.as_deref(), json),
        Command::Images { json } => commands::images(&commands::open_store(&home()?)?, json),
        Command::Check { file, json } => commands::check(&file, json),
        Command::Inspect { reference, json } => {
            commands::inspect(&commands::open_store(&home()?)?, &reference, json)
        }
        Command::Verify { reference, json } => {
            commands::verify(&commands::open_store(&home()?)?, reference.as_deref(), json)
        }
        Command::Push {
            reference,
            dest: Some(dest),
            insecure,
            json,
        } => registry::push(&home()?, &reference, &dest, insecure, json),
        Command::Push {
            reference, json, ..
        } => access::push(&home()?, &reference, json),
        Command::Pull {
            src,
            insecure,
            timeout,
            json,
        } => registry::pull(&home()?, &src, insecure, timeout, json),
        Command::Login {
            host,
            token_stdin,
            json,
            ..
        } if host.starts_with("https://") => access::login(&home()?, &host, token_stdin, json),
        Command::Logout { host } if host.starts_with("https://") => access::logout(&home()?, &host),
        Command::Why { target, json } => why::why(&home()?, &target, json),
        Command::Key(k) => match k {
            KeyCommand::Generate { name, json } => trust::key_generate(&home()?, &name, json),
            KeyCommand::List { json } => trust::key_list(&home()?, json),
        },
        Command::Sign {
            reference,
            key,
            output,
            json,
        } => trust::sign_ref(&home()?, &reference, &key, output.as_deref(), json),
        Command::Signatures { reference, json } => trust::signatures(&home()?, &reference, json),
        Command::Audit(a) => match a.command {
            Some(AuditCommand::Export { file, json }) => audit::export(&home()?, &file, json),
            Some(AuditCommand::Verify {
                file,
                key,
                since_checkpoint,
                allow_unsigned_tail,
                json,
            }) => audit::verify(
                &home()?,
                file.as_deref(),
                &key,
                since_checkpoint.as_deref(),
                allow_unsigned_tail,
                json,
            ),
            None => {
                let filter = audit::Filter {
                    service: a.service,
                    kind: a.kind,
                    since: a.since.as_deref().map(audit::parse_since).transpose()?,
                };
                audit::show(&home()?, &filter, a.json, a.follow)
            }
        },
        Command::Token(t) => match t {
            TokenCommand::Create {
                name,
                role,
                expires,
                json,
            } => access::token_create(&home()?, &name, role, expires, json),
            TokenCommand::List { json } => access::token_list(&home()?, json),
            TokenCommand::Revoke { name, json } => access::token_revoke(&home()?, &name, json),
        },
        Command::Login {
            host,
            username,
            password_stdin,
            insecure,
            ..
        } => registry::login(
            &home()?,
            &host,
            username.as_deref(),
            password_stdin,
            insecure,
        ),
        Command::Logout { host } => registry::logout(&home()?, &host),
        Command::Export {
            reference,
            oci,
            docker_archive,
            tag,
            json,
        } => commands::export(
            &commands::open_store(&home()?)?,
            &reference,
            oci.as_deref(),
            docker_archive.as_deref(),
            tag.as_deref(),
            json,
        ),
        Command::Unpack {
            reference,
            dir,
            json,
        } => commands::unpack(
            &commands::open_store(&home()?)?,
            &reference,
            dir.as_deref(),
            json,
        ),
        Command::Demo { keep, no_wait } => demo::run(cli.home, keep, no_wait),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .map_err(|e| anyhow::Error::new(e).context("cannot write the manual page"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            metrics,
            upgrade,
            gc_above,
            keep_releases,
            gc_grace,
            api,
            tls_cert,
            tls_key,
            checkpoint_every,
            verify_every,
            verify_rate,
            allow_runtime,
            trust,
            etcd,
            etcd_prefix,
            node,
            advertise,
            labels,
            etcd_ca,
            etcd_cert,
            etcd_key,
            cpus,
            memory,
            run_agent,
            successor,
        } => {
            let allow_process = allow_runtime.iter().any(|r| r == "process");
            let drift = kiln_agent::drift::detector::Options {
                verify_every,
                verify_rate,
            };
            let api = api.map(|addr| kiln_agent::ApiOptions {
                addr,
                cert: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| kiln_agent::remote::GivenCert { cert, key }),
            });
            let gc = gc_above.map(|above| kiln_agent::gc::AutoGc {
                above,
                keep_releases,
                grace: gc_grace,
            });
            let mode = kiln_agent::AgentMode {
                successor,
                gc,
                api,
                checkpoint_every: Some(checkpoint_every),
                drift,
                allow_process,
                trust,
                cluster: (!etcd.is_empty()).then_some(kiln_agent::ClusterOptions {
                    etcd,
                    prefix: etcd_prefix,
                    node,
                    advertise: advertise.unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
                    labels: labels.into_iter().collect(),
                    tls: etcd_ca.map(|ca| kiln_agent::EtcdTls {
                        ca,
                        cert: etcd_cert.zip(etcd_key),
                    }),
                }),
                offer: kiln_agent::cluster::Offer {
                    cpus,
                    memory_mib: memory,
                },
            };
            match (upgrade, run_agent) {
                (true, _) => deploy::upgrade(&home()?),
                (false, true) => deploy::agent(&home()?, metrics, mode),
                (false, false) => deploy::serve(&home()?, metrics, mode),
            }
        }
        Command::Gc {
            dry_run,
            keep_releases,
            grace,
            json,
        } => deploy::gc(&home()?, keep_releases, grace, dry_run, json),
        Command::Rollback {
            service,
            to,
            detach,
            json,
        } => deploy::rollback(&home()?, &service, to, detach, json),
        Command::Run {
            service,
            release,
            interactive,
            argv,
        } => deploy::run_command(&home()?, &service, release, argv, interactive),
        Command::Exec {
            instance,
            keep,
            interactive,
            argv,
        } => deploy::exec_command(&home()?, &instance, keep, argv, interactive),
        Command::Promote { service, json } => deploy::promote(&home()?, &service, json),
        Command::Pause {
            service,
            timeout,
            maintenance,
            json,
        } => {
            let timeout = if maintenance {
                std::time::Duration::ZERO
            } else {
                timeout
            };
            deploy::pause(&home()?, &service, Some(timeout), json)
        }
        Command::Resume { service, json } => deploy::pause(&home()?, &service, None, json),
        Command::Abort { service, json } => deploy::abort(&home()?, &service, json),
        Command::Rollout {
            command:
                RolloutCommand::Status {
                    service,
                    wait,
                    json,
                },
        } => deploy::rollout_status(&home()?, &service, wait, json),
        Command::Apply {
            file,
            detach,
            wait,
            prune,
            json,
        } => deploy::apply(&home()?, &file, detach, wait, prune, json),
        Command::Plan {
            file,
            prune,
            exit_code,
            json,
        } => deploy::plan(&home()?, &file, prune, exit_code, json),
        Command::Remove { service, json } => deploy::remove(&home()?, &service, json),
        Command::Status { service, json } => deploy::status(&home()?, service.as_deref(), json),
        Command::History { service, json } => deploy::history(&home()?, &service, json),
        Command::Drift { service, json } => deploy::drift(&home()?, service.as_deref(), json),
        Command::Nodes { json } => deploy::nodes(&home()?, json),
        Command::Drain {
            node,
            no_wait,
            timeout,
            json,
        } => deploy::drain(&home()?, &node, (!no_wait).then_some(timeout), json),
        Command::Undrain { node, json } => deploy::undrain(&home()?, &node, json),
        Command::Logs {
            service,
            release,
            instance,
            hook,
            follow,
            since,
            tail,
            json,
        } => deploy::logs(
            &home()?,
            &service,
            (release, instance.as_deref(), hook),
            follow,
            since.as_deref(),
            tail,
            json,
        ),
    }
}

fn main() -> ExitCode {
    // kiln as its own OCI runtime: the shim between the agent and a
    // container, before anything else runs (it must stay single-threaded).
    {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        if args.get(1).is_some_and(|a| a == kiln_agent::OCI_SHIM_ARG) {
            let code = kiln_agent::oci_shim(&args[2..]);
            return ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX));
        }
    }
    // A closed stdout (`kiln status | head -1`) ends the command quietly, as
    // SIGPIPE would end a C tool: `println!` panics on it (Rust ignores
    // SIGPIPE), and that one panic is not a bug to report.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // (`println!`'s "failed printing to stdout", clap_complete's
        // "failed to write completion file": both the closed stdout.)
        if msg.contains("Broken pipe") || msg.contains("BrokenPipe") {
            std::process::exit(0);
        }
        default(info);
    }));
    let cli = Cli::parse_from(compatible_args(std::env::args_os().collect()));
    // What clap cannot say of flags together: a usage error, exit 2.
    if let Command::Serve {
        etcd,
        etcd_ca,
        etcd_cert,
        ..
    } = &cli.command
        && let Err(e) =
            kiln_core::cluster::check_etcd_tls(etcd, etcd_ca.is_some(), etcd_cert.is_some())
    {
        use clap::CommandFactory;
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit();
    }
    match run(cli) {
        Ok(code) => code,
        // Written output that nobody reads any more: done, quietly.
        Err(e) if closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `--agent` was given on the command line (not only through
/// `KILN_AGENT`).
fn explicit_agent_flag() -> bool {
    std::env::args_os().any(|a| a == "--agent" || a.to_string_lossy().starts_with("--agent="))
}

/// A supervisor of an earlier kiln starts its agent as `kiln serve
/// --agent`; that flag is now `--run-agent` (`--agent URL` names a remote
/// agent). Read the old form so that `kiln serve --upgrade` onto this
/// version works.
fn compatible_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if args.get(1).is_some_and(|a| a == "serve") {
        for i in 2..args.len() {
            let next_is_url = args
                .get(i + 1)
                .is_some_and(|n| n.to_string_lossy().starts_with("https://"));
            if args[i] == "--agent" && !next_is_url {
                args[i] = "--run-agent".into();
            }
        }
    }
    args
}

/// Whether `e` is a write to a closed pipe.
fn closed_stdout(e: &anyhow::Error) -> bool {
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().map(std::io::Error::kind) == broken
            // `--json` writes through serde_json, whose error keeps the kind.
            || c.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == broken
    })
}

/// How long anything new is safe from a collection (`kiln gc --grace`,
/// `kiln serve --gc-grace`): an image just baked or pulled.
const GC_GRACE: &str = "1h";

/// `30s`, `5m`, `1h30m` (humantime).
fn parse_etcd_url(s: &str) -> Result<String, String> {
    kiln_core::cluster::check_etcd_url(s).map(|()| s.trim_end_matches('/').to_owned())
}

/// `--memory SIZE`: what a node offers, in MiB (at least 1).
fn parse_offered_memory(s: &str) -> Result<u64, String> {
    match kiln_core::spec::parse_size(s)? >> 20 {
        0 => Err(format!("`{s}`: offer at least 1M")),
        mib => Ok(mib),
    }
}

fn parse_advertise(s: &str) -> Result<std::net::IpAddr, String> {
    let ip: std::net::IpAddr = s
        .parse()
        .map_err(|_| format!("`{s}` is not an IP address"))?;
    kiln_core::cluster::check_advertise(ip).map(|()| ip)
}

fn parse_etcd_prefix(s: &str) -> Result<String, String> {
    kiln_core::cluster::check_prefix(s).map(|()| s.to_owned())
}

fn parse_node_name(s: &str) -> Result<String, String> {
    kiln_core::cluster::check_node_name(s).map(|()| s.to_owned())
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Issue 13: positional arguments and `--json` had no help text. Every
    /// argument a user can see says what it is.
    #[test]
    fn every_visible_argument_has_help() {
        let mut missing = Vec::new();
        for sub in super::Cli::command().get_subcommands() {
            for cmd in std::iter::once(sub).chain(sub.get_subcommands()) {
                for arg in cmd.get_arguments() {
                    let id = arg.get_id().as_str();
                    if !arg.is_hide_set()
                        && !["help", "version"].contains(&id)
                        && arg.get_help().is_none()
                    {
                        missing.push(format!("{} {id}", cmd.get_name()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }
}
