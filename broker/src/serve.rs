//! Serving HTTP with bounds, for every listener Sluice opens: the Invoke and management API
//! here, and the per-environment Runtime API (`serve` takes any `Router`).
//!
//! A plain accept loop (what `axum::serve` is) trusts its clients: a connection that sends
//! nothing holds a file descriptor forever, and once descriptors run out nothing else is
//! accepted, `/healthz` included. So every connection here has a deadline for its request
//! headers (hyper's `header_read_timeout`, which also closes kept-alive connections left idle
//! and slowloris clients that trickle a header byte by byte), and at most `max_connections` are
//! served at once: past that, new connections wait in the kernel's listen backlog until one
//! closes, instead of failing with EMFILE. The soft RLIMIT_NOFILE is raised to the hard limit
//! at start, and the connection cap is kept below what the descriptor limit allows.
//!
//! A cap alone would let a burst of slow invocations hold every slot and leave `/healthz` and
//! the management API waiting behind them. So a listener may keep a small reserve of
//! connections beyond the cap, served by a router of their own (for the API: everything but
//! invocations, which it answers 429), so that an operator can always look in.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::metrics as m;

/// Descriptors kept for everything but client connections: the state store, environments'
/// pipes and listeners, connections to brokers.
const RESERVED_FDS: u64 = 128;
/// How long the accept loop pauses after a failed accept (EMFILE, ENFILE, ENOBUFS), so that a
/// persistent failure does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: u32,
    /// How long a client may take to send a request's headers, or leave a kept-alive
    /// connection idle.
    pub header_read_timeout: Duration,
}

impl ServeLimits {
    /// The limits of `api:` in the configuration, with the connection cap lowered to fit the
    /// process's descriptor limit.
    pub fn from_config(api: &sluice_config::ApiConfig) -> Self {
        Self {
            max_connections: fit_to_fd_limit(api.max_connections),
            header_read_timeout: api.header_read_timeout,
        }
    }
}

/// `wanted`, or fewer when the soft descriptor limit cannot hold that many connections next
/// to what the rest of Sluice needs.
fn fit_to_fd_limit(wanted: u32) -> u32 {
    let Some((soft, _)) = nofile_limit() else {
        return wanted;
    };
    let room = soft.saturating_sub(RESERVED_FDS).max(16);
    match u32::try_from(room) {
        Ok(room) if room < wanted => {
            tracing::warn!(
                max_connections = wanted,
                fd_limit = soft,
                serving = room,
                "the open-file limit is too low for api.max_connections; serving fewer at once"
            );
            room
        }
        _ => wanted,
    }
}

fn nofile_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (distributions often start services at a
/// soft 1024 with a far higher hard limit). Returns the soft limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(raised.rlim_cur);
    }
    Ok(limit.rlim_cur)
}

/// Which connection of a listener a request came on, unique for the listener's life; lets a
/// handler decide once per connection (the Runtime API checks who is on the other end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

/// Connections served beyond the cap, by a router of their own.
pub struct Reserve {
    pub connections: u32,
    pub app: Router,
}

/// Serves `app` on `listener` within `limits` until `stop` resolves; then stops accepting,
/// closes idle connections, and returns once the requests in progress have been answered.
/// Handlers see the peer address as `ConnectInfo<SocketAddr>` and the connection as
/// [`ConnectionId`]. `name` labels the metrics
/// (`api`, `runtime`). With a `reserve`, connections past the cap are served by its router
/// until the reserve too is full. With `tls`, every connection is TLS; the handshake must end
/// within the header read timeout, so that a client stalling it cannot hold a slot either.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    reserve: Option<Reserve>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()> + Send,
) {
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max as usize));
    let (reserved, reserve_app) = match reserve {
        Some(r) => (r.connections, Some(r.app)),
        None => (0, None),
    };
    let spare = Arc::new(Semaphore::new(reserved as usize));
    let closing = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let open = metrics::gauge!(m::API_OPEN_CONNECTIONS, "listener" => name);
    let header_timeouts = metrics::counter!(m::API_HEADER_TIMEOUTS, "listener" => name);
    let accept_errors = metrics::counter!(m::API_ACCEPT_ERRORS, "listener" => name);
    let tls_errors = metrics::counter!(m::API_TLS_HANDSHAKE_ERRORS, "listener" => name);
    tokio::pin!(stop);
    let mut connections = 0u64;
    loop {
        // A permit first: at the cap, connections wait in the backlog rather than holding a
        // descriptor each.
        let (permit, from_reserve) = tokio::select! {
            biased;
            () = &mut stop => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => (p, false),
                Err(_) => break,
            },
            permit = spare.clone().acquire_owned(), if reserve_app.is_some() => match permit {
                Ok(p) => (p, true),
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_errors.increment(1);
                    tracing::warn!(listener = name, error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // A slot under the cap may have freed while this one waited for a connection.
        let (permit, app) = match (from_reserve, &reserve_app) {
            (true, Some(reserve_app)) => match permits.clone().try_acquire_owned() {
                Ok(main) => (main, app.clone()),
                Err(_) => (permit, reserve_app.clone()),
            },
            _ => (permit, app.clone()),
        };
        let _ = stream.set_nodelay(true);
        connections += 1;
        let connection_id = ConnectionId(connections);
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            let extensions = request.extensions_mut();
            extensions.insert(ConnectInfo::<SocketAddr>(peer));
            extensions.insert(connection_id);
            let app = app.clone();
            async move {
                let Ok(response) = app.oneshot(request).await;
                Ok::<_, Infallible>(response)
            }
        });
        let closing = closing.clone();
        let open = open.clone();
        let header_timeouts = header_timeouts.clone();
        let tls_errors = tls_errors.clone();
        let http = http.clone();
        let tls = tls.clone();
        open.increment(1.0);
        tokio::spawn(async move {
            let _permit = permit;
            let result = match tls {
                None => drive(&http, stream, service, &closing).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    tokio::select! {
                        () = closing.cancelled() => Ok(()),
                        shaken = handshake => match shaken {
                            Ok(Ok(stream)) => drive(&http, stream, service, &closing).await,
                            Ok(Err(e)) => {
                                // Plain HTTP sent to the TLS port ends here, as does a client
                                // that does not trust the certificate.
                                tls_errors.increment(1);
                                tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => {
                                header_timeouts.increment(1);
                                tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                                Ok(())
                            }
                        },
                    }
                }
            };
            open.decrement(1.0);
            if let Err(e) = result {
                if e.is_timeout() {
                    header_timeouts.increment(1);
                }
                tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.cancel();
    // Every connection holds a permit until it ends: all of them back means all have ended.
    let _ = permits.acquire_many(max).await;
    let _ = spare.acquire_many(reserved).await;
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it ends, or until `closing`, when
/// the request in progress is answered and the connection closed.
async fn drive<I, S>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    closing: &CancellationToken,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = axum::response::Response,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        () = closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}
