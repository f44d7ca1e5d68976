//! What the tests of the `sluice` binary share: files, a free port, and a running Sluice that
//! is killed when the test ends.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// Writes an executable `bootstrap` into `dir/fn` (a function package). `dir` is opened to
/// the function (sticky, like `/tmp`): run by a root Sluice, it runs as a user of its own and
/// writes what it records there.
pub fn bootstrap(dir: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let pkg = dir.join("fn");
    std::fs::create_dir_all(&pkg).expect("package dir");
    let bootstrap = pkg.join("bootstrap");
    std::fs::write(&bootstrap, script).expect("bootstrap");
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A `sluice run` child, killed when dropped.
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child this test owns and has not reaped.
        unsafe {
            libc::kill(self.0.id() as i32, signal);
        }
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "sluice did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `sluice run -c CONFIG` on `port` and waits until it listens.
pub fn start(config: &Path, port: u16) -> Server {
    start_with(config, port, &[])
}

/// [`start`] with more arguments for `sluice run`.
pub fn start_with(config: &Path, port: u16, args: &[&str]) -> Server {
    spawn(config, port, &[], args)
}

/// [`start`] through a wrapper command (`setpriv --reuid=…`, to run Sluice as another user).
pub fn start_as(config: &Path, port: u16, wrapper: &[&str]) -> Server {
    spawn(config, port, wrapper, &[])
}

fn spawn(config: &Path, port: u16, wrapper: &[&str], args: &[&str]) -> Server {
    let mut command = match wrapper.split_first() {
        Some((program, wrapper_args)) => {
            let mut command = Command::new(program);
            command.args(wrapper_args).arg(SLUICE);
            command
        }
        None => Command::new(SLUICE),
    };
    let child = command
        .args(["run", "-c"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--grace", "10s"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice starts");
    let mut server = Server(child);
    let stderr = server.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps draining stderr after the start, so that a chatty Sluice never blocks on it.
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
