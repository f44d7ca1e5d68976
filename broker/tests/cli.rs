//! The `sluice` binary as an operator uses it: validate, run, invoke, stop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// A function in a shell one-liner's worth of Python: no dependencies beyond python3.
fn python_function(dir: &Path) {
    let pkg = dir.join("fn");
    std::fs::create_dir_all(&pkg).expect("package dir");
    let bootstrap = pkg.join("bootstrap");
    std::fs::write(
        &bootstrap,
        r#"#!/usr/bin/env python3
import json, os, time, urllib.request
API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]; event = json.loads(r.read())
    print("got", json.dumps(event), flush=True)
    time.sleep(event.get("sleep", 0))
    body = json.dumps({"echo": event}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{API}/invocation/{rid}/response", data=body, method="POST")).close()
"#,
    )
    .expect("bootstrap");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(config: &Path, port: u16) -> Server {
    let child = Command::new(SLUICE)
        .args(["run", "-c"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--grace", "10s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice starts");
    let mut server = Server(child);
    let stderr = server.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Sluice is listening") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("sluice said it is listening");
    server
}

fn invoke(port: u16, name: &str, payload: &str, extra: &[&str]) -> std::process::Output {
    Command::new(SLUICE)
        .args(["invoke", name, "--payload", payload, "--endpoint"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(extra)
        .output()
        .expect("sluice invoke runs")
}

#[test]
fn validate_reports_every_error_with_path_and_line_and_fails() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        "bad.yaml",
        "functions:\n  a:\n    package: ./nowhere\n    timeout: soon\n  b:\n    package: ./nowhere\n    memroy_mb: 256\n",
    );
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(&config)
        .output()
        .expect("validate runs");
    assert!(!out.status.success(), "a bad file must fail validation");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":4:") && stderr.contains("functions.a.timeout"), "{stderr}");
    assert!(stderr.contains(":7:") && stderr.contains("functions.b.memroy_mb"), "{stderr}");
}

#[test]
fn validate_checks_that_packages_exist() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write(dir.path(), "missing.yaml", "functions:\n  a:\n    package: ./nowhere\n");
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(&config)
        .output()
        .expect("validate runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing.yaml:3:") && stderr.contains("functions.a.package") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn validate_accepts_the_quickstart() {
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/sluice.yaml");
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(&quickstart)
        .output()
        .expect("validate runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 functions, 1 sources)"));
}

#[test]
fn run_then_invoke_returns_the_function_result_and_its_log() {
    let dir = tempfile::tempdir().expect("dir");
    python_function(dir.path());
    let config = write(dir.path(), "s.yaml", "functions:\n  echo:\n    package: ./fn\n    timeout: 5s\n");
    let port = free_port();
    let _server = start(&config, port);
    let out = invoke(port, "echo", r#"{"n":1}"#, &["--tail"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json result");
    assert_eq!(result, serde_json::json!({"echo": {"n": 1}}));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("START RequestId:") && log.contains("got {\"n\": 1}") && log.contains("REPORT RequestId:"), "{log}");

    let missing = invoke(port, "nope", "{}", &[]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("ResourceNotFoundException"));
}

#[test]
fn sigterm_lets_the_running_invocation_finish() {
    let dir = tempfile::tempdir().expect("dir");
    python_function(dir.path());
    let config = write(dir.path(), "s.yaml", "functions:\n  slow:\n    package: ./fn\n    timeout: 10s\n");
    let port = free_port();
    let server = start(&config, port);
    let pid = server.0.id();
    let caller = std::thread::spawn(move || invoke(port, "slow", r#"{"sleep":1.5}"#, &[]));
    // Let the invocation reach the function before the signal.
    std::thread::sleep(Duration::from_millis(700));
    let signalled = Instant::now();
    // SAFETY: kill(2) on a child this test owns.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let out = caller.join().expect("caller");
    assert!(out.status.success(), "in-flight invocation lost: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sleep\": 1.5"));
    let mut server = server;
    let status = server.0.wait().expect("sluice exits");
    assert!(status.success(), "sluice exits cleanly after SIGTERM: {status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "stopped within the grace period");
}
