//! Sluice: AWS Lambda's execution environment and event source mappings on your own machines.
//!
//! [`start`] builds the functions of a [`sluice_config::Config`] and serves the
//! Lambda-compatible Invoke API; the `sluice` binary is a thin shell around it.

pub(crate) mod api;
pub mod async_invoke;
pub mod audit;
pub(crate) mod auth;
pub mod concurrency;
pub mod function;
pub mod invocation;
pub(crate) mod manage;
pub mod metrics;
pub(crate) mod operation;
pub(crate) mod permissions;
pub mod pipeline;
pub mod runtime;
pub mod serve;
pub mod state;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_config::Config;
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use function::{BuildError, Function, Functions, InvokeOutcome, Throttle};
pub use invocation::{FunctionError, Invocation};
pub use runtime::native::{Context, NativeRegistry};

/// How to start Sluice beyond what the configuration says.
#[derive(Debug, Default)]
pub struct StartOptions {
    /// Overrides `api.listen`; `127.0.0.1:0` picks a free port.
    pub listen: Option<SocketAddr>,
    /// Handlers for functions with `runtime: native`.
    pub native: NativeRegistry,
    /// Where unpacked packages and local state live. Default: the directory of the
    /// `sqlite://` state file, or a temporary directory when the state is elsewhere.
    pub data_dir: Option<PathBuf>,
    /// Refuse a state store whose schema needs migrations instead of applying them
    /// (`sluice run --no-migrate`, for operators who upgrade with `sluice state migrate`).
    pub no_migrate: bool,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot listen on {addr} (api.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The API would be reachable off loopback with `api.auth: none`.
    #[error("{0}")]
    Unauthenticated(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot prepare the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running Sluice: its API listener, its functions, its sources and its async queue.
pub struct Running {
    addr: SocketAddr,
    functions: Arc<Functions>,
    queue: Arc<async_invoke::AsyncQueue>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    sources: CancellationToken,
    background: Vec<JoinHandle<()>>,
    writer: JoinHandle<()>,
    audit_writer: JoinHandle<()>,
    grace: Duration,
    _temp: Option<tempfile::TempDir>,
}

impl Running {
    pub fn api_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn functions(&self) -> &Arc<Functions> {
        &self.functions
    }

    pub fn async_queue(&self) -> &Arc<async_invoke::AsyncQueue> {
        &self.queue
    }

    /// Stops reading sources and the async queue and stops accepting requests; lets in-flight
    /// invocations finish within `grace`; then retires every execution environment. What did
    /// not finish stays in the queue (or at its source) for the next start.
    pub async fn shutdown_within(mut self, grace: Duration) {
        self.sources.cancel();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let mut pending = std::mem::take(&mut self.background);
        pending.push(self.server);
        let aborts: Vec<_> = pending.iter().map(|t| t.abort_handle()).collect();
        if tokio::time::timeout(grace, futures::future::join_all(pending))
            .await
            .is_err()
        {
            tracing::warn!(grace = ?grace, "in-flight invocations did not finish within the grace period");
            for a in aborts {
                a.abort();
            }
        }
        // Nothing can queue an event any more: the API and the sources are down.
        self.writer.abort();
        // The API's routers, and with them every handle on the audit trail, are gone: the
        // writer finishes what is queued and ends.
        if tokio::time::timeout(AUDIT_DRAIN, &mut self.audit_writer)
            .await
            .is_err()
        {
            tracing::warn!(
                "the audit trail's writer did not finish in time; its queued events are lost"
            );
            self.audit_writer.abort();
        }
        self.functions.shutdown();
    }

    /// Stops within the configured grace period (`shutdown.grace`).
    pub async fn shutdown(self) {
        let grace = self.grace;
        self.shutdown_within(grace).await;
    }
}

/// How long a stop waits for the audit trail's last events to be written.
const AUDIT_DRAIN: Duration = Duration::from_secs(5);

/// Where unpacked packages and local state go when the caller does not say.
fn default_data_dir(config: &Config) -> Option<PathBuf> {
    let path = config.state.strip_prefix("sqlite://")?;
    let path = PathBuf::from(path);
    let path = if path.is_absolute() {
        path
    } else {
        config.base_dir.join(path)
    };
    path.parent().map(PathBuf::from)
}

/// Builds every function and starts the API listener.
///
/// The listener is bound before anything else starts: a second Sluice on the same state whose
/// port is taken fails here, before its async queue workers or sources could take a single
/// event.
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let _ = metrics::prometheus();
    match serve::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    // Before the listener: a wrong certificate or key stops the start with its file named.
    let tls = config.api.tls.as_ref().map(tls::acceptor).transpose()?;
    let addr = options.listen.unwrap_or(config.api.listen);
    if config.api.auth == sluice_config::ApiAuth::None {
        if let Some(refusal) = sluice_config::unauthenticated_api_error(addr) {
            return Err(StartError::Unauthenticated(refusal));
        }
        tracing::warn!(%addr, "api.auth is none: calls to the API are not authenticated; anyone who can reach the address may call every operation");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let (data_dir, temp) = match options.data_dir.or_else(|| default_data_dir(&config)) {
        Some(dir) => (dir, None),
        None => {
            let temp = tempfile::tempdir().map_err(|source| StartError::DataDir {
                path: std::env::temp_dir(),
                source,
            })?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    std::fs::create_dir_all(&data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let functions = Arc::new(Functions::build(&config, &options.native, &data_dir)?);
    let store: Arc<dyn state::StateStore> = Arc::from(
        state::open_with(
            &config.state,
            &config.base_dir,
            if options.no_migrate {
                state::OpenOptions::NO_MIGRATE
            } else {
                state::OpenOptions::INSTANCE
            },
        )
        .await
        .map_err(|e| BuildError {
            errors: vec![config.error_at("state", e.to_string())],
        })?,
    );
    functions.attach_store(store.clone(), &config).await?;
    let dead_letters: HashMap<String, Arc<dyn sluice_plugins::DeadLetterSink>> = config
        .dead_letters
        .iter()
        .map(|(name, dl)| (name.clone(), Arc::from(sluice_plugins::build(dl))))
        .collect();
    let sources = CancellationToken::new();
    let (queue, writer, mut background) = async_invoke::AsyncQueue::start(
        store.clone(),
        functions.clone(),
        dead_letters.clone(),
        sources.child_token(),
    );
    let hooks: Vec<_> = config
        .sources
        .iter()
        .filter(|(_, s)| s.enabled)
        .filter_map(|(name, s)| match &s.kind {
            sluice_config::SourceKind::Http(h) => {
                Some((name.clone(), s.function.clone(), h.clone()))
            }
            _ => None,
        })
        .collect();
    let (trail, audit_writer) = audit::AuditTrail::start(&config.audit, store.clone());
    trail.configuration_loaded(&config);
    background.push(tokio::spawn(audit::purge_expired(
        store.clone(),
        config.audit.retention,
        sources.child_token(),
    )));
    let auth = Arc::new(auth::Auth::new(&config.api, store.clone()));
    let app = api::router(
        api::ApiState {
            functions: functions.clone(),
            queue: queue.clone(),
            store: store.clone(),
            principals: Arc::new(config.api.principals.keys().cloned().collect()),
            metrics_token: config.api.metrics_token.clone(),
        },
        sluice_connectors::http::router(
            &hooks,
            queue.clone(),
            invocation::ACCOUNT_ID,
            Some(auth.clone()),
        ),
        trail,
        auth,
    );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let limits = serve::ServeLimits::from_config(&config.api);
    let reserve = serve::Reserve {
        connections: api::RESERVED_CONNECTIONS,
        app: api::without_invocations(app.clone()),
    };
    let server = tokio::spawn(serve::serve(
        "api",
        listener,
        app,
        limits,
        Some(reserve),
        tls,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let source_tasks = start_sources(&config, &queue, &store, &dead_letters, &sources);
    tracing::info!(%addr, functions = functions.names().count(), sources = source_tasks.len(), "Sluice is listening");
    background.extend(source_tasks);
    Ok(Running {
        addr,
        functions,
        queue,
        stop: Some(stop_tx),
        server,
        sources,
        background,
        writer,
        audit_writer,
        grace: config.shutdown_grace,
        _temp: temp,
    })
}

fn start_sources(
    config: &Config,
    queue: &Arc<async_invoke::AsyncQueue>,
    store: &Arc<dyn state::StateStore>,
    dead_letters: &HashMap<String, Arc<dyn sluice_plugins::DeadLetterSink>>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let dispatch: Arc<dyn sluice_connectors::Dispatch> = queue.clone();
    let mut tasks = Vec::new();
    for (name, source) in &config.sources {
        if !source.enabled {
            tracing::info!(source = %name, "source disabled");
            continue;
        }
        match &source.kind {
            sluice_config::SourceKind::Schedule(schedule) => {
                let source = sluice_connectors::schedule::ScheduleSource::new(
                    name,
                    &source.function,
                    schedule.clone(),
                    invocation::REGION,
                    invocation::ACCOUNT_ID,
                );
                tasks.push(tokio::spawn(source.run(
                    dispatch.clone(),
                    Arc::new(state::ScheduleTicks(store.clone())),
                    stop.child_token(),
                )));
            }
            // Webhooks are routes on the API listener, mounted when it starts.
            sluice_config::SourceKind::Http(_) => {}
            kind => {
                let Some(mapping_config) = source.kind.mapping() else {
                    continue;
                };
                let on_failure = mapping_config
                    .on_failure
                    .as_ref()
                    .and_then(|n| dead_letters.get(n).map(|s| (n.clone(), s.clone())));
                let mapping = match pipeline::Mapping::new(
                    name,
                    &source.function,
                    mapping_config.clone(),
                    queue.functions().clone(),
                    on_failure,
                    stop.child_token(),
                ) {
                    Ok(m) => Arc::new(m),
                    Err(e) => {
                        tracing::error!(source = %name, error = %e, "cannot build the mapping");
                        continue;
                    }
                };
                tasks.push(tokio::spawn(pipeline::run_source(
                    mapping,
                    kind.clone(),
                    store.clone(),
                )));
            }
        }
    }
    tasks
}
