//! The `sluice` binary under conditions an operator meets: a low open-file limit and a flood
//! of idle connections, logs written to a file, a second instance whose port is taken.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SLUICE, Server, bootstrap, free_port, write};

/// Starts `sluice run` on `port` with stderr piped; returns it and the lines it logged up to
/// "Sluice is listening". `nofile` sets the child's open-file limit (soft, hard).
fn run_logged(
    config: &std::path::Path,
    port: u16,
    nofile: Option<(u64, u64)>,
) -> (Server, Vec<String>) {
    let mut command = Command::new(SLUICE);
    command
        .args(["run", "-c"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((soft, hard)) = nofile {
        // SAFETY: setrlimit is async-signal-safe; the struct lives on the child's stack.
        unsafe {
            command.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut server = Server(command.spawn().expect("sluice starts"));
    let stderr = server.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            seen.push(line.clone());
            if line.contains("Sluice is listening") {
                let _ = tx.send(seen.clone());
            }
        }
    });
    let lines = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("sluice said it is listening");
    (server, lines)
}

fn plain_function(dir: &std::path::Path) -> std::path::PathBuf {
    bootstrap(dir, "#!/bin/sh\nexit 0\n");
    write(
        dir,
        "s.yaml",
        "api:\n  header_read_timeout: 1s\nfunctions:\n  f:\n    package: ./fn\n",
    )
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("dir");
    let config = plain_function(dir.path());
    let (_server, lines) = run_logged(&config, free_port(), None);
    let text = lines.join("\n");
    assert!(text.contains("INFO"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a piped log: {text:?}"
    );
}

/// GET /healthz on a new connection; the status line, or why there is none within `limit`.
fn healthz(port: u16, limit: Duration) -> Result<String, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("{e} (read so far: {answer:?})"))?;
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn idle_connections_past_the_open_file_limit_do_not_lock_out_healthz() {
    let dir = tempfile::tempdir().expect("dir");
    let config = plain_function(dir.path());
    let port = free_port();
    // A soft and hard limit of 1024, as many services start with: 1,100 idle connections
    // would take every descriptor Sluice has.
    let (_server, _) = run_logged(&config, port, Some((1024, 1024)));
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    }
    let started = Instant::now();
    let status = healthz(port, Duration::from_secs(8));
    assert_eq!(
        status.as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(idle);
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let config = plain_function(dir.path());
    let (server, _) = run_logged(&config, free_port(), Some((1024, 8192)));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.0.id()))
        .expect("the child's limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["8192", "8192"], "{open_files}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sluice_whose_port_is_taken_leaves_queued_events_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let ran = dir.path().join("ran");
    bootstrap(
        dir.path(),
        &format!(
            "#!/bin/sh\ntouch {}\nexit 1\n",
            ran.to_str().expect("utf-8 path")
        ),
    );
    let state = dir.path().join("state.db");
    let config = write(
        dir.path(),
        "s.yaml",
        &format!(
            "state: sqlite://{}\nfunctions:\n  f:\n    package: ./fn\n",
            state.display()
        ),
    );
    let store = sluice::state::open(&format!("sqlite://{}", state.display()), dir.path())
        .await
        .expect("open the state");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let events: Vec<_> = (0..5)
        .map(|i| sluice::state::QueuedEvent {
            id: format!("queued-{i}"),
            function: "f".into(),
            qualifier: None,
            payload: b"{}".to_vec(),
            trace_id: sluice::invocation::new_trace_id(),
            received_at_ms: now,
            next_attempt_ms: now,
            attempts: Vec::new(),
        })
        .collect();
    store.apply(&events, &[]).await.expect("queue events");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = Command::new(SLUICE)
        .args(["run", "-c"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .expect("sluice runs");
    assert!(!out.status.success(), "a taken port fails the start");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen on"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !ran.exists(),
        "a queued event was invoked before the bind failed"
    );
    assert_eq!(store.queued().await.expect("queued"), 5);
    drop(taken);
}
