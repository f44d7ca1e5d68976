//! `runtime: process`: Sluice starts the package's program and serves it the AWS Lambda
//! Runtime API, so functions built for Lambda's custom runtimes run unchanged.
//!
//! Each execution environment is one process with its own Runtime API listener on loopback.
//! An invocation is handed to the environment's `next` long-poll and its reply comes back
//! through a one-shot channel, as in a warm Lambda sandbox. Environments are reused while
//! they stay healthy; a crash, a timeout or an init failure retires them, and one idle for
//! `limits.idle_timeout` is stopped.
//!
//! A burst does not start one environment per request: at most `environment_starts` of a
//! function and `limits.environment_starts` in all start at once. A caller waits for whichever
//! comes first, a warm environment or a start slot, until the function's timeout, and is then
//! throttled (429 `TooManyRequestsException` on the Invoke API).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use tokio::net::unix::pipe;
use tokio::sync::{Notify, Semaphore, SemaphorePermit, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::memory::{EnvMemory, MemoryCap};
use super::peer;
use super::sandbox::Sandbox;
use super::user::{self, UserIds};
use crate::concurrency::Throttle;
use crate::invocation::{Executed, FunctionError, Invocation, MAX_SYNC_PAYLOAD};
use crate::serve::ConnectionId;

/// How long a new environment may take to ask for its first event.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Output kept per invocation; older bytes are dropped first.
const MAX_OUTPUT: usize = 256 * 1024;
/// Connections one environment may hold open to its Runtime API; a runtime needs one or two.
const RUNTIME_API_CONNECTIONS: u32 = 16;

/// Everything needed to start an environment of one function version.
#[derive(Debug, Clone)]
pub(crate) struct ProcessSpec {
    pub function_name: String,
    pub version: String,
    pub memory_mb: u32,
    pub timeout: Duration,
    pub task_root: PathBuf,
    pub argv: Vec<String>,
    pub handler: String,
    pub environment: BTreeMap<String, String>,
    pub region: String,
    /// The size of the environment's own `/tmp`.
    pub ephemeral_storage: u64,
    /// The execution role's keys, as the variables the AWS SDKs read; empty without a role.
    pub credentials: Vec<(&'static str, sluice_config::Secret)>,
    /// The user the environment runs as; `None` when Sluice is not root (its own uid).
    pub user: Option<UserIds>,
    pub network: sluice_config::Network,
}

/// What every runner of this Sluice shares about environments' lives.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    /// Environments starting at once, across all functions (`limits.environment_starts`).
    pub starts: Arc<Semaphore>,
    /// An environment idle this long is stopped (`limits.idle_timeout`).
    pub idle_timeout: Duration,
    /// Where environments get a private `TMPDIR` when they cannot have their own `/tmp`.
    pub scratch: PathBuf,
}

/// Runs the invocations of one function version on its warm environments, starting new ones
/// within the start limits.
pub(crate) struct ProcessRunner {
    inner: Arc<Inner>,
}

struct Inner {
    spec: Arc<ProcessSpec>,
    memory: MemoryCap,
    lifecycle: Arc<Lifecycle>,
    /// This function's environments starting at once (shared by all its versions).
    function_starts: Arc<Semaphore>,
    idle: Mutex<Vec<(Environment, Instant)>>,
    /// Signalled each time an environment becomes idle, for the callers queued for one.
    returned: Notify,
    closed: AtomicBool,
    reaper: std::sync::Once,
    next_env: AtomicU64,
}

/// An environment for one invocation: a warm one, or a new one with the start permits it
/// holds until its runtime asks for the first event.
enum Acquired<'a> {
    Warm(Environment),
    Cold(Environment, Instant, StartPermits<'a>),
}

type StartPermits<'a> = (SemaphorePermit<'a>, SemaphorePermit<'a>);

impl ProcessRunner {
    pub(crate) fn new(
        spec: ProcessSpec,
        memory: MemoryCap,
        lifecycle: Arc<Lifecycle>,
        function_starts: Arc<Semaphore>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                spec: Arc::new(spec),
                memory,
                lifecycle,
                function_starts,
                idle: Mutex::new(Vec::new()),
                returned: Notify::new(),
                closed: AtomicBool::new(false),
                reaper: std::sync::Once::new(),
                next_env: AtomicU64::new(1),
            }),
        }
    }

    /// Stops every idle environment, and every busy one as its invocation ends.
    pub(crate) fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.lock_idle().clear();
    }

    /// Runs one invocation; refused with a throttle when no environment could be had (warm or
    /// newly started) within the function's timeout.
    pub(crate) async fn invoke(&self, inv: &Invocation) -> Result<Executed, Throttle> {
        let inner = &self.inner;
        inner.start_reaper();
        let deadline = Instant::now() + inner.spec.timeout;
        // A warm environment that died while idle is replaced once, silently: the invocation
        // never reached it.
        for _ in 0..2 {
            let acquired = match inner.acquire(deadline).await {
                Ok(Ok(acquired)) => acquired,
                Ok(Err(start_error)) => return Ok(start_error),
                Err(throttle) => {
                    // Counted by the throttle metric; a burst would flood the log at warn.
                    tracing::debug!(function = %inner.spec.function_name,
                        "no execution environment free or startable within the timeout: throttled");
                    return Err(throttle);
                }
            };
            let (env, cold) = match acquired {
                Acquired::Warm(env) => (env, None),
                Acquired::Cold(env, since, permits) => (env, Some((since, permits))),
            };
            match env.invoke(inv, cold).await {
                Attempt::Done { executed, healthy } => {
                    if healthy {
                        inner.put_idle(env);
                    }
                    return Ok(executed);
                }
                Attempt::DiedIdle => continue,
            }
        }
        Ok(Executed::failed(FunctionError::new(
            "Runtime.ExitError",
            format!(
                "RequestId: {} Error: the execution environment exited before taking the event",
                inv.request_id
            ),
        )))
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<(Environment, Instant)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_idle(&self) -> Option<Environment> {
        let mut idle = self.lock_idle();
        // The most recently used first: it is the warmest, and the others age towards reaping.
        while let Some((env, _)) = idle.pop() {
            if env.is_alive() {
                return Some(env);
            }
        }
        None
    }

    fn put_idle(&self, env: Environment) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        self.lock_idle().push((env, Instant::now()));
        self.returned.notify_one();
    }

    /// Stops the environments idle for longer than the idle timeout.
    fn reap(&self) {
        let timeout = self.lifecycle.idle_timeout;
        let reaped: Vec<Environment> = {
            let mut idle = self.lock_idle();
            let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|(env, since)| since.elapsed() >= timeout || !env.is_alive());
            *idle = keep;
            old.into_iter().map(|(env, _)| env).collect()
        };
        if !reaped.is_empty() {
            tracing::debug!(function = %self.spec.function_name, version = %self.spec.version,
                count = reaped.len(), "stopping idle execution environments");
            metrics::counter!(crate::metrics::FUNCTION_ENVIRONMENTS_REAPED,
                "function" => self.spec.function_name.clone())
            .increment(reaped.len() as u64);
        }
        // Dropping an environment kills it, outside the lock.
        drop(reaped);
    }

    /// Starts, on first use, the task that reaps this runner's idle environments; it ends
    /// when the runner is dropped.
    fn start_reaper(self: &Arc<Self>) {
        self.reaper.call_once(|| {
            let weak = Arc::downgrade(self);
            let period = (self.lifecycle.idle_timeout / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(15));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let Some(inner) = weak.upgrade() else { break };
                    inner.reap();
                }
            });
        });
    }

    /// A warm environment, or a new one once this function and Sluice as a whole have a free
    /// start slot; whichever comes first. Past `deadline`, a throttle. A new environment that
    /// cannot even be spawned is the invocation's error.
    async fn acquire(&self, deadline: Instant) -> Result<Result<Acquired<'_>, Executed>, Throttle> {
        loop {
            // Registered before looking, so an environment returned in between is not missed.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(env) = self.take_idle() {
                return Ok(Ok(Acquired::Warm(env)));
            }
            let permits = tokio::select! {
                biased;
                _ = &mut returned => continue,
                permits = self.start_permits() => permits,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(Throttle::Scaling);
                }
            };
            let Some(permits) = permits else {
                return Err(Throttle::Scaling);
            };
            // A slot came free, but so may have an environment meanwhile: prefer it.
            if let Some(env) = self.take_idle() {
                return Ok(Ok(Acquired::Warm(env)));
            }
            let started = Instant::now();
            let id = self.next_env.fetch_add(1, Ordering::Relaxed);
            return match Environment::start(
                self.spec.clone(),
                &self.memory,
                &self.lifecycle.scratch,
                id,
            )
            .await
            {
                Ok(env) => {
                    metrics::counter!(crate::metrics::FUNCTION_COLD_STARTS,
                        "function" => self.spec.function_name.clone())
                    .increment(1);
                    Ok(Ok(Acquired::Cold(env, started, permits)))
                }
                Err(e) => {
                    tracing::error!(function = %self.spec.function_name, error = %e,
                        "cannot start an execution environment");
                    Ok(Err(Executed::failed(FunctionError::new(
                        "Runtime.StartError",
                        format!("cannot start {:?}: {e}", self.spec.argv),
                    ))))
                }
            };
        }
    }

    /// A start slot of this function, then one of Sluice's (always in this order, so two
    /// callers never hold one each and wait for the other's).
    async fn start_permits(&self) -> Option<StartPermits<'_>> {
        let own = self.function_starts.acquire().await.ok()?;
        let global = self.lifecycle.starts.acquire().await.ok()?;
        Some((own, global))
    }
}

enum Attempt {
    Done { executed: Executed, healthy: bool },
    DiedIdle,
}

/// What the Runtime API side tells the invoker.
enum Reply {
    Response(Bytes),
    Error(FunctionError),
}

struct Pending {
    inv: Invocation,
    timeout: Duration,
    picked: oneshot::Sender<Instant>,
    reply: oneshot::Sender<Reply>,
}

#[derive(Debug, Clone)]
enum Status {
    Running,
    InitFailed(FunctionError),
    Exited(String),
}

struct Current {
    request_id: String,
    reply: oneshot::Sender<Reply>,
}

struct Shared {
    pending: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    current: Mutex<Option<Current>>,
    status: watch::Sender<Status>,
    /// Set by the first `/next`: from then on the runtime is initialised and `/init/error`
    /// is no longer a transition it may make.
    initialised: AtomicBool,
    function_name: String,
    /// The listener's own address, the remote end of every client socket of this API.
    api_addr: SocketAddr,
    /// The environment's processes, known once it is spawned; until then nobody is admitted.
    owner: std::sync::OnceLock<Owner>,
    /// The verdict on recent connections (a runtime keeps one alive across invocations).
    admitted: Mutex<std::collections::VecDeque<(ConnectionId, bool)>>,
}

/// What tells the environment's processes apart from everyone else's.
struct Owner {
    pid: u32,
    memory: Arc<EnvMemory>,
}

/// Connection verdicts kept; an environment holds at most `RUNTIME_API_CONNECTIONS` at once.
const ADMITTED_KEPT: usize = 4 * RUNTIME_API_CONNECTIONS as usize;

/// Output of an environment, both streams into one buffer so lines keep their order.
struct Output {
    buf: Mutex<Vec<u8>>,
    pipes: [Arc<pipe::Receiver>; 2],
}

impl Output {
    /// Reads whatever the pipes hold right now, without waiting.
    fn drain_into(&self, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 8192];
        for pipe in &self.pipes {
            while let Ok(n) = pipe.try_read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        if buf.len() > MAX_OUTPUT {
            let excess = buf.len() - MAX_OUTPUT;
            buf.drain(..excess);
        }
    }

    /// Everything written so far. A runtime writes its output before it posts the result, so
    /// a final non-blocking read catches what the pump task has not seen yet.
    fn take(&self) -> Vec<u8> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        self.drain_into(&mut buf);
        std::mem::take(&mut *buf)
    }
}

struct Environment {
    spec: Arc<ProcessSpec>,
    pid: Option<u32>,
    _sandbox: Arc<Sandbox>,
    tx: mpsc::Sender<Pending>,
    status: watch::Receiver<Status>,
    output: Arc<Output>,
    memory: Arc<EnvMemory>,
    tasks: Vec<JoinHandle<()>>,
    /// The environment's own network namespace (`network: none`), held while it lives.
    _netns: Option<Arc<super::netns::Isolated>>,
}

impl Drop for Environment {
    fn drop(&mut self) {
        self.kill();
        // The exit watcher is left to run: it reaps the killed process and then removes the
        // environment's cgroup, which the kernel refuses while the process is a zombie.
        for t in &self.tasks[..self.tasks.len().saturating_sub(1)] {
            t.abort();
        }
    }
}

impl Environment {
    async fn start(
        spec: Arc<ProcessSpec>,
        cap: &MemoryCap,
        scratch: &std::path::Path,
        id: u64,
    ) -> io::Result<Self> {
        // With `network: none` the listener lives in the environment's own network namespace,
        // which the namespace descriptor keeps alive until the environment is dropped.
        let (listener, netns) = match spec.network {
            sluice_config::Network::Host => (
                tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?,
                None,
            ),
            sluice_config::Network::None => {
                let isolated = tokio::task::spawn_blocking(super::netns::isolated_listener)
                    .await
                    .map_err(io::Error::other)??;
                isolated.listener.set_nonblocking(true)?;
                let listener = isolated.listener.try_clone()?;
                (
                    tokio::net::TcpListener::from_std(listener)?,
                    Some(Arc::new(isolated)),
                )
            }
        };
        let api_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(1);
        let (status_tx, status_rx) = watch::channel(Status::Running);
        let shared = Arc::new(Shared {
            pending: tokio::sync::Mutex::new(rx),
            current: Mutex::new(None),
            status: status_tx,
            initialised: AtomicBool::new(false),
            function_name: spec.function_name.clone(),
            api_addr,
            owner: std::sync::OnceLock::new(),
            admitted: Mutex::new(std::collections::VecDeque::new()),
        });
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .layer(axum::middleware::from_fn_with_state(shared.clone(), admit))
            .with_state(shared.clone());
        // The same bounded serving as the public API: a function that opens connections to
        // its own Runtime API without end, or sends headers byte by byte, is cut off. A
        // runtime's kept-alive connection idles while its handler runs, so the header timeout
        // outlasts the function's timeout.
        let limits = crate::serve::ServeLimits {
            max_connections: RUNTIME_API_CONNECTIONS,
            header_read_timeout: spec.timeout + Duration::from_secs(30),
        };
        let server = tokio::spawn(crate::serve::serve(
            "runtime",
            listener,
            app,
            limits,
            None,
            None,
            std::future::pending(),
        ));

        let memory = Arc::new(cap.prepare(spec.memory_mb)?);
        let log_stream = format!(
            "{}/[{}]{:016x}",
            chrono::Utc::now().format("%Y/%m/%d"),
            spec.version,
            id ^ u64::from(std::process::id()) << 32
        );
        let program = resolve_program(&spec)?;
        let sandbox = Arc::new(Sandbox::prepare(
            &spec.task_root,
            &program,
            spec.ephemeral_storage,
            scratch,
            &format!("{}-{id}", std::process::id()),
            spec.user,
        )?);
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&spec.argv[1..])
            .current_dir(&spec.task_root)
            .env_clear()
            .envs(lambda_environment(&spec, api_addr, &log_stream))
            .envs(&spec.environment)
            .envs(
                spec.credentials
                    .iter()
                    .map(|(name, value)| (name, value.expose())),
            )
            .envs(sandbox.environment())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let hook = memory.child_hook();
        let confine = sandbox.child_hook();
        let run_as = spec.user;
        let netns_fd = netns.as_ref().map(|n| n.namespace_fd());
        // SAFETY: the hooks only make async-signal-safe calls (see ChildHook::enter,
        // NamespaceHook::enter and `user`).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = netns_fd {
                    super::netns::enter(fd)?;
                }
                hook.enter()?;
                if let Some(confine) = &confine {
                    confine.enter()?;
                }
                // Last: entering the cgroup and making mounts need root.
                if let Some(ids) = run_as {
                    user::drop_to(ids)?;
                }
                user::no_new_privs()
            });
        }
        let spawned = cmd.spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                sandbox.clean_up();
                return Err(e);
            }
        };
        let pid = child.id();
        if let Some(pid) = pid {
            let _ = shared.owner.set(Owner {
                pid,
                memory: memory.clone(),
            });
        }
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr pipe"))?;
        let output = Arc::new(Output {
            buf: Mutex::new(Vec::new()),
            pipes: [
                Arc::new(pipe::Receiver::from_owned_fd(stdout.into_owned_fd()?)?),
                Arc::new(pipe::Receiver::from_owned_fd(stderr.into_owned_fd()?)?),
            ],
        });
        let mut tasks = vec![server];
        for i in 0..2 {
            let out = output.clone();
            tasks.push(tokio::spawn(async move {
                let pipe = out.pipes[i].clone();
                while pipe.readable().await.is_ok() {
                    let mut chunk = [0u8; 8192];
                    let mut buf = out.buf.lock().unwrap_or_else(|p| p.into_inner());
                    match pipe.try_read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                    if buf.len() > MAX_OUTPUT {
                        let excess = buf.len() - MAX_OUTPUT;
                        buf.drain(..excess);
                    }
                }
            }));
        }
        let exit_shared = shared.clone();
        let exit_memory = memory.clone();
        let exit_sandbox = sandbox.clone();
        tasks.push(tokio::spawn(async move {
            let text = match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("cannot wait for the runtime: {e}"),
            };
            // Whatever the runtime left running (a `setsid` child, a double fork) goes with
            // it; the cgroup can only be removed once it is empty.
            exit_memory.kill_all().await;
            drop(exit_memory);
            exit_sandbox.clean_up();
            // An init failure already said why; the exit that follows adds nothing.
            exit_shared.status.send_if_modified(|s| {
                if matches!(s, Status::Running) {
                    *s = Status::Exited(text);
                    true
                } else {
                    false
                }
            });
        }));
        tracing::debug!(function = %spec.function_name, pid, runtime_api = %api_addr,
            memory = %cap.describe(), "execution environment started");
        Ok(Self {
            spec,
            pid,
            _sandbox: sandbox,
            tx,
            status: status_rx,
            output,
            memory,
            tasks,
            _netns: netns,
        })
    }

    fn is_alive(&self) -> bool {
        matches!(*self.status.borrow(), Status::Running)
    }

    /// Kills the environment: every process of its cgroup where it has one. Without a
    /// cgroup only the process group goes, so a process that left it (`setsid`, a daemon's
    /// double fork) escapes and lives on.
    fn kill(&self) {
        if let Some(pid) = self.pid {
            // SAFETY: kill(2) with a negative pid signals the group; no memory is involved.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
        self.memory.kill_now();
    }

    async fn invoke(&self, inv: &Invocation, cold: Option<(Instant, StartPermits<'_>)>) -> Attempt {
        let (cold_since, start_permits) = match cold {
            Some((since, permits)) => (Some(since), Some(permits)),
            None => (None, None),
        };
        let (picked_tx, picked_rx) = oneshot::channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let pending = Pending {
            inv: inv.clone(),
            timeout: self.spec.timeout,
            picked: picked_tx,
            reply: reply_tx,
        };
        if self.tx.send(pending).await.is_err() {
            return Attempt::DiedIdle;
        }
        let mut status = self.status.clone();
        let request_id = &inv.request_id;

        // Phase 1: the runtime takes the event (at once when warm; after its init when cold).
        let picked = tokio::select! {
            biased;
            picked = picked_rx => picked.ok(),
            _ = wait_not_running(&mut status) => None,
            _ = tokio::time::sleep(INIT_TIMEOUT) => {
                self.kill();
                return self.done(inv, Err(FunctionError::new(
                    "Runtime.InitTimeout",
                    format!("RequestId: {request_id} Error: the runtime did not ask for an event within {:.2} seconds of starting", INIT_TIMEOUT.as_secs_f64()),
                )), false, cold_since);
            }
        };
        let Some(picked_at) = picked else {
            let state = status.borrow().clone();
            return match state {
                Status::InitFailed(e) => {
                    self.kill();
                    self.done(inv, Err(e), false, cold_since)
                }
                Status::Exited(how) if cold_since.is_some() => self.done(
                    inv,
                    Err(self.exit_error(request_id, &how)),
                    false,
                    cold_since,
                ),
                _ => Attempt::DiedIdle,
            };
        };
        // Started: the slot goes to the next environment waiting to start.
        drop(start_permits);
        let init_duration = cold_since.map(|since| picked_at.saturating_duration_since(since));

        // Phase 2: the function runs until it replies, dies or runs out of time.
        let deadline = picked_at + self.spec.timeout;
        let reply = tokio::select! {
            biased;
            reply = reply_rx => reply.ok(),
            _ = wait_not_running(&mut status) => None,
            _ = tokio::time::sleep_until(deadline.into()) => {
                self.kill();
                metrics::counter!(crate::metrics::FUNCTION_TIMEOUTS,
                    "function" => self.spec.function_name.clone()).increment(1);
                return self.done_after_init(inv, Err(FunctionError::timed_out(self.spec.timeout)), false, init_duration);
            }
        };
        match reply {
            Some(Reply::Response(body)) => self.done_after_init(inv, Ok(body), true, init_duration),
            Some(Reply::Error(e)) => self.done_after_init(inv, Err(e), true, init_duration),
            None => {
                // The process may have written its last words; give the exit a moment to land
                // so the error says how it ended.
                let state = status.borrow().clone();
                let how = match state {
                    Status::Exited(how) => how,
                    Status::InitFailed(e) => e.error_message,
                    Status::Running => "the runtime stopped answering".to_string(),
                };
                self.kill();
                self.done_after_init(
                    inv,
                    Err(self.exit_error(request_id, &how)),
                    false,
                    init_duration,
                )
            }
        }
    }

    fn exit_error(&self, request_id: &str, how: &str) -> FunctionError {
        if self.memory.oom_killed() {
            FunctionError::new(
                "Runtime.OutOfMemory",
                format!(
                    "RequestId: {request_id} Error: Runtime exited with error: {how} (out of memory: memory_mb is {})",
                    self.spec.memory_mb
                ),
            )
        } else {
            FunctionError::new(
                "Runtime.ExitError",
                format!("RequestId: {request_id} Error: Runtime exited with error: {how}"),
            )
        }
    }

    fn done(
        &self,
        inv: &Invocation,
        result: Result<Bytes, FunctionError>,
        healthy: bool,
        cold_since: Option<Instant>,
    ) -> Attempt {
        self.done_after_init(inv, result, healthy, cold_since.map(|s| s.elapsed()))
    }

    fn done_after_init(
        &self,
        inv: &Invocation,
        result: Result<Bytes, FunctionError>,
        healthy: bool,
        init_duration: Option<Duration>,
    ) -> Attempt {
        Attempt::Done {
            executed: Executed {
                result,
                output: self.output.take(),
                max_memory_bytes: if inv.want_log {
                    self.memory.peak_bytes(self.pid)
                } else {
                    None
                },
                init_duration,
            },
            healthy: healthy && self.is_alive(),
        }
    }
}

async fn wait_not_running(status: &mut watch::Receiver<Status>) {
    let _ = status.wait_for(|s| !matches!(s, Status::Running)).await;
    // Without a status change, this branch must never win the select.
    if matches!(*status.borrow(), Status::Running) {
        std::future::pending::<()>().await;
    }
}

fn resolve_program(spec: &ProcessSpec) -> io::Result<PathBuf> {
    let first = spec
        .argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let path = PathBuf::from(first);
    if path.is_absolute() {
        return Ok(path);
    }
    if first.contains('/') {
        // Relative to the package, as Lambda runs `bootstrap` from the task root.
        let in_root = spec.task_root.join(&path);
        if !in_root.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found in the package", path.display()),
            ));
        }
        return Ok(in_root);
    }
    // A bare name is looked up on the function's PATH, not Sluice's.
    if let Some(candidate) = sluice_config::on_function_path(first) {
        return Ok(candidate);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("`{first}` not found in the package or on PATH ({FUNCTION_PATH})"),
    ))
}

use sluice_config::FUNCTION_PATH;

/// The environment Lambda gives a function; nothing of Sluice's own environment leaks in.
fn lambda_environment(
    spec: &ProcessSpec,
    api: SocketAddr,
    log_stream: &str,
) -> Vec<(&'static str, String)> {
    let root = spec.task_root.display().to_string();
    vec![
        ("PATH", FUNCTION_PATH.to_string()),
        ("LANG", "C.UTF-8".to_string()),
        ("TZ", ":UTC".to_string()),
        ("HOME", root.clone()),
        ("AWS_LAMBDA_RUNTIME_API", api.to_string()),
        ("_HANDLER", spec.handler.clone()),
        ("AWS_LAMBDA_FUNCTION_NAME", spec.function_name.clone()),
        ("AWS_LAMBDA_FUNCTION_VERSION", spec.version.clone()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            spec.memory_mb.to_string(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{}", spec.function_name),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME", log_stream.to_string()),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_string()),
        ("AWS_REGION", spec.region.clone()),
        ("AWS_DEFAULT_REGION", spec.region.clone()),
        (
            "AWS_EXECUTION_ENV",
            "AWS_Lambda_provided.al2023".to_string(),
        ),
        ("LAMBDA_TASK_ROOT", root),
        ("LAMBDA_RUNTIME_DIR", "/var/runtime".to_string()),
    ]
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGKILL => "killed",
            libc::SIGABRT => "aborted",
            libc::SIGSEGV => "segmentation fault",
            libc::SIGTERM => "terminated",
            _ => "",
        };
        if name.is_empty() {
            format!("signal: {sig}")
        } else {
            format!("signal: {name}")
        }
    } else {
        "exited".to_string()
    }
}

// ---- the Runtime API, served to one environment ----

fn runtime_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    let body = serde_json::json!({ "errorType": error_type, "errorMessage": message });
    (status, axum::Json(body)).into_response()
}

async fn next(State(shared): State<Arc<Shared>>) -> Response {
    shared.initialised.store(true, Ordering::SeqCst);
    if shared
        .current
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some()
    {
        // The runtime has an event it has not answered: asking for another is not a
        // transition the Runtime API allows (and, with one event per environment, it would
        // only ever wait).
        return invalid_state_transition(&shared, "Invoking", "Ready");
    }
    let pending = {
        let mut rx = shared.pending.lock().await;
        rx.recv().await
    };
    let Some(p) = pending else {
        return runtime_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Runtime.Shutdown",
            "the environment is shutting down",
        );
    };
    let picked_at = Instant::now();
    let deadline_ms = (SystemTime::now() + p.timeout)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let inv = p.inv;
    *shared.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(Current {
        request_id: inv.request_id.clone(),
        reply: p.reply,
    });
    let _ = p.picked.send(picked_at);

    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    put("content-type", "application/json");
    put("lambda-runtime-aws-request-id", &inv.request_id);
    put("lambda-runtime-deadline-ms", &deadline_ms.to_string());
    put("lambda-runtime-invoked-function-arn", &inv.invoked_arn);
    put("lambda-runtime-trace-id", &inv.trace_id);
    if let Some(cc) = &inv.client_context {
        put("lambda-runtime-client-context", cc);
    }
    if let Some(ci) = &inv.cognito_identity {
        put("lambda-runtime-cognito-identity", ci);
    }
    (StatusCode::OK, headers, Body::from(inv.payload)).into_response()
}

fn take_current(shared: &Shared, id: &str) -> Option<Current> {
    let mut current = shared.current.lock().unwrap_or_else(|e| e.into_inner());
    if current.as_ref().is_some_and(|c| c.request_id == id) {
        current.take()
    } else {
        None
    }
}

async fn response(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let Some(current) = take_current(&shared, &id) else {
        return invalid_request_id(&shared);
    };
    match axum::body::to_bytes(body, MAX_SYNC_PAYLOAD).await {
        Ok(bytes) => {
            let _ = current.reply.send(Reply::Response(bytes));
            (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({"status": "OK"})),
            )
                .into_response()
        }
        Err(_) => {
            let message = format!(
                "Response payload size exceeded maximum allowed payload size ({MAX_SYNC_PAYLOAD} bytes)."
            );
            let _ = current.reply.send(Reply::Error(FunctionError::new(
                "Function.ResponseSizeTooLarge",
                message.clone(),
            )));
            runtime_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &message,
            )
        }
    }
}

async fn error(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(current) = take_current(&shared, &id) else {
        return invalid_request_id(&shared);
    };
    let header_type = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok());
    let _ = current
        .reply
        .send(Reply::Error(FunctionError::from_runtime_body(
            &body,
            header_type,
        )));
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"status": "OK"})),
    )
        .into_response()
}

async fn init_error(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if shared.initialised.load(Ordering::SeqCst) {
        // Only a runtime still initialising may report an init failure; later, an error
        // belongs to an invocation (`/invocation/{id}/error`).
        return invalid_state_transition(&shared, "Ready", "InitError");
    }
    let header_type = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .or(Some("Runtime.Unknown"));
    let error = FunctionError::from_runtime_body(&body, header_type);
    shared
        .status
        .send_modify(|s| *s = Status::InitFailed(error));
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"status": "OK"})),
    )
        .into_response()
}

/// 403 `InvalidStateTransition`, in the words of Lambda's Runtime API.
fn invalid_state_transition(shared: &Shared, from: &str, to: &str) -> Response {
    refused(shared, "state");
    runtime_error(
        StatusCode::FORBIDDEN,
        "InvalidStateTransition",
        &format!(
            "State transition from {from} to {to} failed for runtime. Error: State transition is not allowed"
        ),
    )
}

/// 400 `InvalidRequestID`: not the request id of the invocation this environment is running.
fn invalid_request_id(shared: &Shared) -> Response {
    refused(shared, "request_id");
    runtime_error(
        StatusCode::BAD_REQUEST,
        "InvalidRequestID",
        "Invalid request ID",
    )
}

fn refused(shared: &Shared, reason: &'static str) {
    metrics::counter!(crate::metrics::RUNTIME_API_REFUSED,
        "function" => shared.function_name.clone(), "reason" => reason)
    .increment(1);
}

/// Admits a request only from a connection whose client socket a process of this environment
/// holds (see `peer`); decided once per connection.
async fn admit(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next_layer: axum::middleware::Next,
) -> Response {
    let connection = request.extensions().get::<ConnectionId>().copied();
    let peer_addr = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let admitted = match (connection, peer_addr) {
        (Some(connection), Some(peer_addr)) => {
            let known = shared
                .admitted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(c, _)| *c == connection)
                .map(|(_, ok)| *ok);
            match known {
                Some(ok) => ok,
                None => {
                    let ok = is_own_connection(&shared, peer_addr).await;
                    let mut admitted = shared.admitted.lock().unwrap_or_else(|e| e.into_inner());
                    if admitted.len() >= ADMITTED_KEPT {
                        admitted.pop_front();
                    }
                    admitted.push_back((connection, ok));
                    if !ok {
                        tracing::debug!(function = %shared.function_name, peer = %peer_addr,
                            "Runtime API connection from a process outside the environment refused");
                    }
                    ok
                }
            }
        }
        _ => false,
    };
    if admitted {
        next_layer.run(request).await
    } else {
        refused(&shared, "foreign");
        runtime_error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            "this Runtime API serves another execution environment",
        )
    }
}

async fn is_own_connection(shared: &Shared, peer_addr: SocketAddr) -> bool {
    let Some(owner) = shared.owner.get() else {
        return false;
    };
    let (pid, memory, api_addr) = (owner.pid, owner.memory.clone(), shared.api_addr);
    tokio::task::spawn_blocking(move || {
        let Ok(Some(inode)) = peer::client_socket_inode(pid, peer_addr, api_addr) else {
            return false;
        };
        let pids = memory.procs().unwrap_or_else(|| peer::process_group(pid));
        peer::held_by(&pids, inode)
    })
    .await
    .unwrap_or(false)
}
