//! The state store's schema as an operator handles it with the `sluice` binary: `state
//! version`, `state migrate [--dry-run]`, `run --no-migrate`, a second process on one SQLite
//! file, and a store newer than the binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{SLUICE, free_port, start_with, write};
use sqlx::Connection;

/// A configuration whose state is a copy of the first release's SQLite store.
fn first_release_setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v0.sqlite"),
        dir.path().join("data/state.db"),
    )
    .expect("copy the fixture");
    let config = write(
        dir.path(),
        "sluice.yaml",
        "state: sqlite://./data/state.db\nfunctions:\n  hello: {runtime: http, url: \"http://127.0.0.1:9/\"}\n",
    );
    (dir, config)
}

fn sluice(args: &[&str], config: &Path) -> Output {
    Command::new(SLUICE)
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .expect("sluice runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `sluice run` on `config` with `args`, expected to refuse to start: its stderr.
fn refused_run(config: &Path, args: &[&str]) -> String {
    let out = Command::new(SLUICE)
        .args(["run", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .expect("sluice runs");
    assert!(!out.status.success(), "{}", stderr(&out));
    stderr(&out)
}

#[test]
fn an_operator_upgrades_a_first_release_store_deliberately() {
    let (_dir, config) = first_release_setup();
    let version = sluice(&["state", "version"], &config);
    assert!(version.status.success(), "{}", stderr(&version));
    assert_eq!(
        stdout(&version),
        "state store schema version 0 (this Sluice: 4; made before versioned migrations, adopted as version 1)\npending: 1 (initial schema), 2 (schedule ticks), 3 (function policies), 4 (audit events)\n"
    );

    let refusal = refused_run(&config, &["--no-migrate"]);
    assert!(
        refusal.contains("the state store's schema is at version 0 and this Sluice needs version 4 (pending: 1 (initial schema), 2 (schedule ticks), 3 (function policies), 4 (audit events)): run `sluice state migrate`"),
        "{refusal}"
    );

    let dry = sluice(&["state", "migrate", "--dry-run"], &config);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        stdout(&dry).ends_with(
            "would apply: 1 (initial schema), 2 (schedule ticks), 3 (function policies), 4 (audit events)\n"
        ),
        "{}",
        stdout(&dry)
    );
    assert!(
        stdout(&sluice(&["state", "version"], &config)).contains("pending: 1"),
        "a dry run changes nothing"
    );

    let migrated = sluice(&["state", "migrate"], &config);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    assert_eq!(
        stdout(&migrated),
        "applied 1 (initial schema), 2 (schedule ticks), 3 (function policies), 4 (audit events); schema version now 4\n"
    );
    assert!(stdout(&sluice(&["state", "version"], &config)).ends_with("up to date\n"));
    assert_eq!(
        stdout(&sluice(&["state", "migrate"], &config)),
        "up to date at schema version 4\n"
    );

    // Now --no-migrate starts; while it runs, the store belongs to it.
    let port = free_port();
    let _running = start_with(&config, port, &["--no-migrate"]);
    let second = refused_run(&config, &[]);
    assert!(
        second.contains("is in use by another Sluice process (pid ")
            && second.contains("postgres://"),
        "{second}"
    );
    let busy = sluice(&["state", "migrate"], &config);
    assert!(!busy.status.success(), "migrating under a running Sluice");
    assert!(
        stdout(&sluice(&["state", "version"], &config)).ends_with("up to date\n"),
        "reading the version beside a running Sluice works"
    );
}

#[test]
fn a_store_from_a_newer_sluice_is_refused_naming_both_versions() {
    let (dir, config) = first_release_setup();
    assert!(sluice(&["state", "migrate"], &config).status.success());
    let db = dir.path().join("data/state.db");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("connect");
        sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (7, 'from the future', TRUE, x'00', 0)")
            .execute(&mut conn)
            .await
            .expect("stamp");
        conn.close().await.expect("close");
    });
    let run = refused_run(&config, &[]);
    assert!(
        run.contains("the state store's schema is at version 7, newer than this Sluice understands (up to version 4)"),
        "{run}"
    );
    let version = sluice(&["state", "version"], &config);
    assert!(!version.status.success());
    assert!(
        stdout(&version).contains("newer than this Sluice"),
        "{}",
        stdout(&version)
    );
    // The refusal left the store alone.
    assert!(stdout(&sluice(&["state", "version"], &config)).contains("schema version 7"));
}
