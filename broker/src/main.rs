//! The `sluice` command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Lambda's event source mappings and execution environment, self-hosted"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Sluice with a configuration file.
    Run {
        /// The configuration file.
        #[arg(short, long, default_value = "sluice.yaml")]
        config: PathBuf,
        /// Address of the Invoke API, overriding `api.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// How long in-flight invocations may finish after SIGTERM.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        grace: Duration,
        /// Refuse to start on a state store that needs migrations, instead of applying them.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Inspect or upgrade the state store's schema.
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// Check a configuration file without starting anything: the YAML, the packages, the
    /// commands and the state directory, every problem in one report.
    Validate {
        /// The configuration file (default `sluice.yaml`).
        #[arg(conflicts_with = "config")]
        file: Option<PathBuf>,
        /// The configuration file, given as `run` takes it.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Invoke a function of a running Sluice through its Invoke API.
    Invoke {
        /// Function name, optionally with a qualifier (`name:live`).
        name: String,
        /// The event, as JSON.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// A version or alias, like the Invoke API's `Qualifier`.
        #[arg(long)]
        qualifier: Option<String>,
        /// `RequestResponse`, `Event` (prints the request id once the event is queued) or
        /// `DryRun`.
        #[arg(long, default_value = "RequestResponse")]
        invocation_type: String,
        /// Print the invocation's log tail to stderr.
        #[arg(long)]
        tail: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the audit trail's events from the state store, oldest first, one JSON per line.
    Audit {
        /// The configuration file naming the store (`state:`).
        #[arg(short, long, default_value = "sluice.yaml")]
        config: PathBuf,
        /// Only events at most this old (`1h`, `30m`, `7d`).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only calls by this principal.
        #[arg(long)]
        principal: Option<String>,
        /// Only events of this name (`PublishVersion`, `LoadConfiguration`).
        #[arg(long)]
        event: Option<String>,
        /// At most this many events: the newest ones.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    #[command(flatten)]
    Manage(Manage),
}

#[derive(Subcommand)]
enum StateAction {
    /// Print the store's schema version and what this Sluice would apply.
    Version {
        /// The configuration file naming the store (`state:`).
        #[arg(short, long, default_value = "sluice.yaml")]
        config: PathBuf,
    },
    /// Apply pending migrations now (Sluice otherwise applies them at start).
    Migrate {
        /// The configuration file naming the store (`state:`).
        #[arg(short, long, default_value = "sluice.yaml")]
        config: PathBuf,
        /// Print what would be applied and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Management commands: each is one call to the Lambda API of a running Sluice, whose JSON
/// answer is printed as it comes.
#[derive(Subcommand)]
enum Manage {
    /// Publish `$LATEST` as a new immutable version; with nothing changed since the last
    /// version, that version is returned instead.
    Publish {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a function's versions, `$LATEST` first.
    Versions {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Create, read, change and delete aliases.
    Alias {
        #[command(subcommand)]
        action: AliasAction,
        #[command(flatten)]
        remote: Remote,
    },
    /// Read function configurations.
    Functions {
        #[command(subcommand)]
        action: FunctionsAction,
        #[command(flatten)]
        remote: Remote,
    },
    /// Set, read and remove a function's reserved concurrency.
    Concurrency {
        #[command(subcommand)]
        action: ConcurrencyAction,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Where the running Sluice is. Management commands are thin clients of its Lambda API.
#[derive(Args)]
struct Remote {
    /// Sluice's API address; defaults to `api.listen` of `--config`, else 127.0.0.1:9000.
    #[arg(long, env = "SLUICE_ENDPOINT", global = true)]
    endpoint: Option<String>,
    /// Read the API address from this configuration file.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AliasAction {
    /// Point a new alias at a version.
    Create {
        name: String,
        alias: String,
        /// The version it points at: a number or `$LATEST`.
        #[arg(long)]
        version: String,
        /// Send a share of the invocations to another version: `VERSION=WEIGHT` (`2=0.1`).
        #[arg(long, value_parser = parse_weight)]
        weight: Vec<(String, f64)>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Show an alias.
    Get { name: String, alias: String },
    /// Change what is given; the rest stays.
    Update {
        name: String,
        alias: String,
        #[arg(long)]
        version: Option<String>,
        /// Replaces the alias's weights: `VERSION=WEIGHT` (`2=0.1`).
        #[arg(long, value_parser = parse_weight, conflicts_with = "no_weights")]
        weight: Vec<(String, f64)>,
        /// Remove the alias's weights: every invocation goes to its version.
        #[arg(long)]
        no_weights: bool,
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete an alias; its versions stay.
    Delete { name: String, alias: String },
    /// List a function's aliases.
    List { name: String },
}

#[derive(Subcommand)]
enum FunctionsAction {
    /// Every function's `$LATEST` configuration.
    List,
    /// One function's configuration: `NAME`, `NAME:VERSION` or `NAME:ALIAS`.
    Get { name: String },
}

#[derive(Subcommand)]
enum ConcurrencyAction {
    /// Reserve `N` concurrent executions for the function (0 stops every invocation).
    Put { name: String, reserved: u32 },
    /// Show the reservation (`{}` when there is none).
    Get { name: String },
    /// Remove the reservation: the function shares the unreserved pool again.
    Delete { name: String },
}

fn parse_weight(s: &str) -> Result<(String, f64), String> {
    let (version, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected VERSION=WEIGHT, like `2=0.1`"))?;
    let weight = weight
        .parse()
        .map_err(|_| format!("`{s}`: the weight `{weight}` is not a number"))?;
    Ok((version.to_string(), weight))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    sluice_config::parse_duration(s)
}

fn main() -> ExitCode {
    // Before anything else: Sluice's environment holds its secrets (AWS keys, the database
    // password), and functions, or any process of Sluice's uid, must not read them from
    // /proc/<pid>/environ or trace Sluice.
    let undumpable = sluice::runtime::user::make_undumpable();
    let cli = Cli::parse();
    // Colours only for a person at a terminal: a log file or journald would keep the escape
    // codes as noise.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = undumpable {
        tracing::warn!(error = %e, "cannot make Sluice undumpable (PR_SET_DUMPABLE): processes of its uid may read its environment");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                config,
                listen,
                grace,
                no_migrate,
            } => run(&config, listen, grace, no_migrate).await,
            Command::State { action } => state(action).await,
            Command::Audit {
                config,
                since,
                principal,
                event,
                limit,
            } => {
                let query = sluice::state::AuditQuery {
                    since_ms: since.map(|since| {
                        chrono::Utc::now().timestamp_millis()
                            - i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
                    }),
                    principal,
                    event_name: event,
                    limit,
                };
                audit(&config, &query).await
            }
            Command::Validate { file, config } => {
                let path = file
                    .or(config)
                    .unwrap_or_else(|| PathBuf::from("sluice.yaml"));
                validate(&path).await
            }
            Command::Invoke {
                name,
                payload,
                qualifier,
                invocation_type,
                tail,
                remote,
            } => invoke(&remote, &name, payload, qualifier, &invocation_type, tail).await,
            Command::Manage(command) => {
                let (remote, call) = command.into_call();
                manage(&remote, call).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<sluice_config::Config, ExitCode> {
    sluice_config::load_file(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::FAILURE
    })
}

async fn run(
    path: &Path,
    listen: Option<SocketAddr>,
    grace: Duration,
    no_migrate: bool,
) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    match listen {
        Some(listen) => {
            if config.api.auth == sluice_config::ApiAuth::None
                && let Some(error) = sluice_config::unauthenticated_api_error(listen)
            {
                eprintln!("--listen: {error}");
                return Ok(ExitCode::FAILURE);
            }
        }
        None => print_warnings(&config),
    }
    let options = sluice::StartOptions {
        listen,
        no_migrate,
        ..Default::default()
    };
    let running = match sluice::start(config, options).await {
        Ok(r) => r,
        Err(sluice::StartError::Build(errors)) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(grace = ?grace, "stopping: finishing in-flight invocations");
    running.shutdown_within(grace).await;
    Ok(ExitCode::SUCCESS)
}

/// Dangerous but allowed settings, loudly, before anything starts.
fn print_warnings(config: &sluice_config::Config) {
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
}

async fn validate(path: &Path) -> anyhow::Result<ExitCode> {
    // One pass: the YAML's errors, then what building the functions and this machine say
    // about the part of the configuration that could be read, all in file order.
    let (config, mut errors) = sluice_config::check_file(path);
    if let Some(config) = &config {
        // Building checks packages as `run` will: they exist and fit their limits. Anything
        // it unpacks goes to a directory removed on return.
        let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
        if let Err(build) =
            sluice::Functions::build(config, &sluice::NativeRegistry::new(), scratch.path())
        {
            errors.extend(build.errors);
        }
        errors.extend(sluice_config::check_host(config));
        // The certificate and key as the listener will load them.
        if let Some(tls) = &config.api.tls
            && let Err(e) = sluice::tls::acceptor(tls)
        {
            errors.push(config.error_at("api.tls", e.to_string()));
        }
        print_warnings(config);
    }
    if !errors.is_empty() {
        sluice_config::sort_errors(&mut errors);
        eprintln!("{}", sluice_config::ConfigErrors { errors });
        return Ok(ExitCode::FAILURE);
    }
    let Some(config) = config else {
        return Ok(ExitCode::FAILURE);
    };
    println!(
        "{}: ok ({} functions, {} sources)",
        path.display(),
        config.functions.len(),
        config.sources.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `sluice audit`: reads the store without claiming it, beside a running Sluice.
async fn audit(path: &Path, query: &sluice::state::AuditQuery) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let events = sluice::state::audit_events(&config.state, &config.base_dir, query)
        .await
        .with_context(|| {
            format!(
                "cannot read the audit trail from the state store {}",
                config.state
            )
        })?;
    let mut out = std::io::stdout().lock();
    for event in events {
        use std::io::Write as _;
        writeln!(out, "{}", event.event)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice state version` and `sluice state migrate`.
async fn state(action: StateAction) -> anyhow::Result<ExitCode> {
    use sluice::state::migrations::describe;
    let (path, dry_run) = match &action {
        StateAction::Version { config } => (config, true),
        StateAction::Migrate { config, dry_run } => (config, *dry_run),
    };
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let status = sluice::state::status(&config.state, &config.base_dir)
        .await
        .with_context(|| format!("cannot read the state store {}", config.state))?;
    let pending = status.pending();
    if dry_run {
        println!(
            "state store schema version {} (this Sluice: {}{})",
            status.version(),
            status.latest,
            if status.unversioned {
                "; made before versioned migrations, adopted as version 1"
            } else {
                ""
            }
        );
        if let Err(too_new) = status.check_not_newer() {
            println!("{too_new}");
            return Ok(ExitCode::FAILURE);
        }
        match (&action, pending.is_empty()) {
            (_, true) => println!("up to date"),
            (StateAction::Migrate { .. }, false) => {
                println!("would apply: {}", describe(&pending));
            }
            (StateAction::Version { .. }, false) => println!("pending: {}", describe(&pending)),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let applied = sluice::state::migrate(&config.state, &config.base_dir)
        .await
        .with_context(|| format!("cannot migrate the state store {}", config.state))?;
    if applied.is_empty() {
        println!("up to date at schema version {}", status.latest);
    } else {
        println!(
            "applied {}; schema version now {}",
            describe(&applied),
            status.latest
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The path prefixes of Lambda's API, which differ by the year each operation appeared.
const FUNCTIONS: &str = "2015-03-31/functions";
const CONCURRENCY_WRITE: &str = "2017-10-31/functions";
const CONCURRENCY_READ: &str = "2019-09-30/functions";

/// One request to the Lambda API of a running Sluice.
struct Call {
    method: Method,
    /// Path segments, each percent-encoded on its own.
    path: Vec<String>,
    query: Vec<(&'static str, String)>,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
}

impl Call {
    /// A call to `/{api}/{segments…}`; `api` is one of the prefixes above.
    fn new(method: Method, api: &str, segments: &[&str]) -> Self {
        Self {
            method,
            path: api
                .split('/')
                .chain(segments.iter().copied())
                .map(str::to_string)
                .collect(),
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
        }
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Some(body.to_string());
        self
    }
}

/// A JSON object of the fields that are set.
fn object<const N: usize>(fields: [(&str, Option<Value>); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect(),
    )
}

fn routing(weights: Vec<(String, f64)>) -> Value {
    let weights: serde_json::Map<String, Value> = weights
        .into_iter()
        .map(|(v, w)| (v, Value::from(w)))
        .collect();
    json!({ "AdditionalVersionWeights": weights })
}

impl Manage {
    /// Where the call goes and what it is.
    fn into_call(self) -> (Remote, Call) {
        match self {
            Manage::Publish {
                name,
                description,
                remote,
            } => {
                let body = object([("Description", description.map(Value::from))]);
                let call = Call::new(Method::POST, FUNCTIONS, &[&name, "versions"]).json(body);
                (remote, call)
            }
            Manage::Versions { name, remote } => (
                remote,
                Call::new(Method::GET, FUNCTIONS, &[&name, "versions"]),
            ),
            Manage::Alias { action, remote } => (remote, action.into_call()),
            Manage::Functions { action, remote } => {
                let call = match action {
                    FunctionsAction::List => Call::new(Method::GET, FUNCTIONS, &[]),
                    FunctionsAction::Get { name } => Call::new(Method::GET, FUNCTIONS, &[&name]),
                };
                (remote, call)
            }
            Manage::Concurrency { action, remote } => {
                let call = match action {
                    ConcurrencyAction::Put { name, reserved } => {
                        Call::new(Method::PUT, CONCURRENCY_WRITE, &[&name, "concurrency"])
                            .json(json!({ "ReservedConcurrentExecutions": reserved }))
                    }
                    ConcurrencyAction::Get { name } => {
                        Call::new(Method::GET, CONCURRENCY_READ, &[&name, "concurrency"])
                    }
                    ConcurrencyAction::Delete { name } => {
                        Call::new(Method::DELETE, CONCURRENCY_WRITE, &[&name, "concurrency"])
                    }
                };
                (remote, call)
            }
        }
    }
}

impl AliasAction {
    fn into_call(self) -> Call {
        match self {
            AliasAction::Create {
                name,
                alias,
                version,
                weight,
                description,
            } => {
                let body = object([
                    ("Name", Some(Value::from(alias))),
                    ("FunctionVersion", Some(Value::from(version))),
                    ("Description", description.map(Value::from)),
                    (
                        "RoutingConfig",
                        (!weight.is_empty()).then(|| routing(weight)),
                    ),
                ]);
                Call::new(Method::POST, FUNCTIONS, &[&name, "aliases"]).json(body)
            }
            AliasAction::Get { name, alias } => {
                Call::new(Method::GET, FUNCTIONS, &[&name, "aliases", &alias])
            }
            AliasAction::Update {
                name,
                alias,
                version,
                weight,
                no_weights,
                description,
            } => {
                let body = object([
                    ("FunctionVersion", version.map(Value::from)),
                    ("Description", description.map(Value::from)),
                    (
                        "RoutingConfig",
                        (no_weights || !weight.is_empty()).then(|| routing(weight)),
                    ),
                ]);
                Call::new(Method::PUT, FUNCTIONS, &[&name, "aliases", &alias]).json(body)
            }
            AliasAction::Delete { name, alias } => {
                Call::new(Method::DELETE, FUNCTIONS, &[&name, "aliases", &alias])
            }
            AliasAction::List { name } => Call::new(Method::GET, FUNCTIONS, &[&name, "aliases"]),
        }
    }
}

fn endpoint(remote: &Remote) -> Result<String, ExitCode> {
    let endpoint = match (&remote.endpoint, &remote.config) {
        (Some(e), _) => e.clone(),
        (None, Some(path)) => {
            let config = load(path)?;
            let scheme = if config.api.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", config.api.listen)
        }
        (None, None) => "http://127.0.0.1:9000".to_string(),
    };
    Ok(if endpoint.contains("://") {
        endpoint
    } else {
        format!("http://{endpoint}")
    })
}

/// Sends `call`. A refusal is printed as Lambda's error type and message and comes back as
/// the exit code to end with.
async fn send(remote: &Remote, call: Call) -> anyhow::Result<Result<reqwest::Response, ExitCode>> {
    let endpoint = match endpoint(remote) {
        Ok(e) => e,
        Err(code) => return Ok(Err(code)),
    };
    let mut url =
        reqwest::Url::parse(&endpoint).with_context(|| format!("`{endpoint}` is not a URL"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("`{endpoint}` cannot take a path"))?
        .pop_if_empty()
        .extend(&call.path);
    if !call.query.is_empty() {
        url.query_pairs_mut().extend_pairs(&call.query);
    }
    let mut request = reqwest::Client::new().request(call.method, url);
    for (name, value) in &call.headers {
        request = request.header(*name, value);
    }
    if let Some(body) = call.body {
        request = request.body(body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach Sluice at {endpoint}"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(Ok(response));
    }
    let error_type = response
        .headers()
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("RequestFailed")
        .to_string();
    let body = response.text().await.unwrap_or_default();
    let parsed: Value = serde_json::from_str(&body).unwrap_or_default();
    let field = |name: &str| parsed.get(name).and_then(Value::as_str).map(str::to_string);
    let message = field("Message")
        .or_else(|| field("message"))
        .unwrap_or(body);
    match field("Reason") {
        Some(reason) => eprintln!("error: {error_type} ({reason}): {message}"),
        None => eprintln!("error: {error_type}: {message}"),
    }
    Ok(Err(ExitCode::FAILURE))
}

/// A management command: one call, its JSON answer printed as it came.
async fn manage(remote: &Remote, call: Call) -> anyhow::Result<ExitCode> {
    let response = match send(remote, call).await? {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let body = response.text().await.context("cannot read the response")?;
    match serde_json::from_str::<Value>(&body) {
        Ok(value) => println!("{}", serde_json::to_string_pretty(&value)?),
        Err(_) if body.is_empty() => {}
        Err(_) => println!("{body}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn invoke(
    remote: &Remote,
    name: &str,
    payload: String,
    qualifier: Option<String>,
    invocation_type: &str,
    tail: bool,
) -> anyhow::Result<ExitCode> {
    let mut call = Call::new(Method::POST, FUNCTIONS, &[name, "invocations"]);
    call.body = Some(payload);
    call.headers
        .push(("x-amz-invocation-type", invocation_type.to_string()));
    if tail {
        call.headers.push(("x-amz-log-type", "Tail".to_string()));
    }
    if let Some(q) = qualifier {
        call.query.push(("Qualifier", q));
    }
    let response = match send(remote, call).await? {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if invocation_type == "Event" {
        // Queued, not run: the request id is what there is to show.
        println!("{}", header("x-amzn-requestid").unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let function_error = header("x-amz-function-error");
    if let Some(log) = header("x-amz-log-result")
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
    {
        eprint!("{}", String::from_utf8_lossy(&log));
    }
    let body = response.text().await.context("cannot read the response")?;
    if !body.is_empty() {
        println!("{body}");
    }
    if let Some(kind) = function_error {
        eprintln!("function error: {kind}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
