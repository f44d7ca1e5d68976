//! Sluice: AWS Lambda's execution environment and event source mappings on your own machines.
//!
//! [`start`] builds the functions of a [`sluice_config::Config`] and serves the
//! Lambda-compatible Invoke API; the `sluice` binary is a thin shell around it.

pub(crate) mod api;
pub mod function;
pub mod invocation;
pub mod metrics;
pub mod runtime;

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
    #[error("cannot prepare the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running Sluice: its API listener and its functions.
pub struct Running {
    addr: SocketAddr,
    functions: Arc<Functions>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    sources: CancellationToken,
    source_tasks: Vec<JoinHandle<()>>,
    _temp: Option<tempfile::TempDir>,
}

impl Running {
    pub fn api_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn functions(&self) -> &Arc<Functions> {
        &self.functions
    }

    /// Stops accepting requests, lets in-flight invocations finish within `grace`, then
    /// retires every execution environment.
    pub async fn shutdown_within(mut self, grace: Duration) {
        self.sources.cancel();
        for task in self.source_tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(grace, &mut self.server).await.is_err() {
            tracing::warn!(grace = ?grace, "in-flight invocations did not finish within the grace period");
            self.server.abort();
        }
        self.functions.shutdown();
    }

    pub async fn shutdown(self) {
        self.shutdown_within(Duration::from_secs(30)).await;
    }
}

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
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let _ = metrics::prometheus();
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
    let addr = options.listen.unwrap_or(config.api.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let app = api::router(api::ApiState {
        functions: functions.clone(),
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the API server stopped");
        }
    });
    let sources = CancellationToken::new();
    let source_tasks = start_sources(&config, &functions, &sources);
    tracing::info!(%addr, functions = functions.names().count(), sources = source_tasks.len(), "Sluice is listening");
    Ok(Running {
        addr,
        functions,
        stop: Some(stop_tx),
        server,
        sources,
        source_tasks,
        _temp: temp,
    })
}

fn start_sources(
    config: &Config,
    functions: &Arc<Functions>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let dispatch: Arc<dyn sluice_connectors::Dispatch> = functions.clone();
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
                tasks.push(tokio::spawn(source.run(dispatch.clone(), stop.child_token())));
            }
        }
    }
    tasks
}
