//! The README's AWS CLI commands, run word for word as a reader would: against the
//! quickstart, with the AWS CLI v1 that `pip install awscli` gives (the test virtualenv's), in
//! an environment holding nothing but what the commands export. CLI v1 knows no
//! `--cli-binary-format`, and every CLI call wants a region and some credentials even though
//! Sluice checks none; the commands must work anyway, and with CLI v2 alike (a `fileb://`
//! payload is sent as it is by both).
//!
//! Needs `SLUICE_TEST_VENV` (scripts/test sets it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{free_port, start};

/// The README's commands, as they appear there (the quickstart listens on 127.0.0.1:9000).
const README_AWS_CLI: &str = r#"export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1
printf '{"name":"Ada"}' > payload.json
aws lambda invoke --endpoint-url http://127.0.0.1:9000 --function-name hello \
    --payload fileb://payload.json out.json
cat out.json
"#;

fn venv_bin() -> PathBuf {
    let venv = std::env::var("SLUICE_TEST_VENV").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_VENV is not set: this test needs the test virtualenv's AWS CLI. Run it \
             with scripts/test, which makes one"
        )
    });
    Path::new(&venv).join("bin")
}

/// Copies a directory tree (file modes too, so the bootstrap stays executable).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a directory");
    for entry in std::fs::read_dir(from).expect("read a directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Runs `script` with `sh` in `dir`, with only the virtualenv's tools on the path and no AWS
/// configuration of the caller's.
fn run_as_reader(script: &str, dir: &Path) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", venv_bin().display()))
        .env("HOME", dir)
        .output()
        .expect("sh runs")
}

#[test]
fn the_readmes_aws_cli_invoke_works_with_cli_v1_and_nothing_configured() {
    assert!(
        include_str!("../../README.md").contains(README_AWS_CLI),
        "the README no longer shows these commands word for word: update README_AWS_CLI"
    );
    let dir = tempfile::tempdir().expect("dir");
    let quickstart = dir.path().join("quickstart");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart"),
        &quickstart,
    );
    let port = free_port();
    let _server = start(&quickstart.join("sluice.yaml"), port);
    let reader = dir.path().join("reader");
    std::fs::create_dir_all(&reader).expect("the reader's directory");

    let version = run_as_reader("aws --version", &reader);
    let version = format!(
        "{}{}",
        String::from_utf8_lossy(&version.stdout),
        String::from_utf8_lossy(&version.stderr)
    );
    assert!(
        version.starts_with("aws-cli/1."),
        "the test virtualenv's AWS CLI should be v1, the one the README must work with: {version}"
    );

    let script = README_AWS_CLI.replace("127.0.0.1:9000", &format!("127.0.0.1:{port}"));
    let out = run_as_reader(&script, &reader);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the README's commands failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(r#""StatusCode": 200"#), "{stdout}");
    assert!(
        stdout.trim_end().ends_with(r#"{"greeting": "hello, Ada"}"#),
        "out.json holds the function's result: {stdout}"
    );
}
