//! The `sluice` command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Lambda's event source mappings and execution environment, self-hosted")]
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
    },
    /// Check a configuration file without starting anything; every error is reported.
    Validate {
        /// The configuration file.
        file: PathBuf,
    },
    /// Invoke a function of a running Sluice through its Invoke API.
    Invoke {
        /// Function name, optionally with a qualifier (`name:live`).
        name: String,
        /// The event, as JSON.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Sluice's API address; defaults to `api.listen` of `--config`, else 127.0.0.1:9000.
        #[arg(long, env = "SLUICE_ENDPOINT")]
        endpoint: Option<String>,
        /// Read the API address from this configuration file.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// `RequestResponse` or `DryRun`.
        #[arg(long, default_value = "RequestResponse")]
        invocation_type: String,
        /// Print the invocation's log tail to stderr.
        #[arg(long)]
        tail: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    sluice_config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
            } => run(&config, listen, grace).await,
            Command::Validate { file } => validate(&file).await,
            Command::Invoke {
                name,
                payload,
                endpoint,
                config,
                invocation_type,
                tail,
            } => invoke(&name, payload, endpoint, config, &invocation_type, tail).await,
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

async fn run(path: &Path, listen: Option<SocketAddr>, grace: Duration) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let options = sluice::StartOptions {
        listen,
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

async fn validate(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    // Building checks what loading cannot: packages exist and fit their limits. Anything it
    // unpacks goes to a directory removed on return.
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    if let Err(errors) =
        sluice::Functions::build(&config, &sluice::NativeRegistry::new(), scratch.path())
    {
        eprintln!("{errors}");
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "{}: ok ({} functions, {} sources)",
        path.display(),
        config.functions.len(),
        config.sources.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn invoke(
    name: &str,
    payload: String,
    endpoint: Option<String>,
    config: Option<PathBuf>,
    invocation_type: &str,
    tail: bool,
) -> anyhow::Result<ExitCode> {
    let endpoint = match (endpoint, config) {
        (Some(e), _) => e,
        (None, Some(path)) => match load(&path) {
            Ok(c) => format!("http://{}", c.api.listen),
            Err(code) => return Ok(code),
        },
        (None, None) => "http://127.0.0.1:9000".to_string(),
    };
    let url = format!(
        "{}/2015-03-31/functions/{}/invocations",
        endpoint.trim_end_matches('/'),
        name
    );
    let mut request = reqwest::Client::new()
        .post(&url)
        .header("x-amz-invocation-type", invocation_type)
        .body(payload);
    if tail {
        request = request.header("x-amz-log-type", "Tail");
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach Sluice at {endpoint}"))?;
    let status = response.status();
    let function_error = response
        .headers()
        .get("x-amz-function-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let error_type = response
        .headers()
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(log) = response
        .headers()
        .get("x-amz-log-result")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
    {
        eprint!("{}", String::from_utf8_lossy(&log));
    }
    let body = response.text().await.context("cannot read the response")?;
    if !status.is_success() {
        eprintln!(
            "error: {} ({status}): {body}",
            error_type.as_deref().unwrap_or("request failed")
        );
        return Ok(ExitCode::FAILURE);
    }
    if !body.is_empty() {
        println!("{body}");
    }
    if let Some(kind) = function_error {
        eprintln!("function error: {kind}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
