//! Hostile packages as an operator meets them through the `sluice` binary: `sluice validate`
//! refuses a zip bomb and a package holding a FIFO with an error naming the package and the
//! limit, and a Sluice that does not run as root still keeps a function from writing into its
//! unpacked task root and gives it a `/tmp` of its own (in a user namespace where the kernel
//! allows one, a private `TMPDIR` otherwise).

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{SLUICE, free_port, start_as, write};

/// A zip of 8 MB of zeros (a few kilobytes deflated) whose headers claim 1,000 bytes.
fn zip_bomb(path: &Path) {
    let file = std::fs::File::create(path).expect("zip file");
    let mut writer = zip::ZipWriter::new(file);
    writer
        .start_file("bomb", zip::write::SimpleFileOptions::default())
        .expect("start");
    writer.write_all(&vec![0u8; 8_000_000]).expect("write");
    writer.finish().expect("finish");
    let mut bytes = std::fs::read(path).expect("zip bytes");
    let mut i = 0;
    while i + 4 <= bytes.len() {
        let (size_at, skip) = match &bytes[i..i + 4] {
            b"PK\x03\x04" => (22, 30),
            b"PK\x01\x02" => (24, 46),
            _ => {
                i += 1;
                continue;
            }
        };
        bytes[i + size_at..i + size_at + 4].copy_from_slice(&1000u32.to_le_bytes());
        i += skip;
    }
    std::fs::write(path, bytes).expect("rewrite");
}

fn validate(config: &Path) -> (bool, String) {
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(config)
        .output()
        .expect("validate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_refuses_a_zip_that_inflates_past_the_limit_it_declares_under() {
    let dir = tempfile::tempdir().expect("dir");
    zip_bomb(&dir.path().join("bomb.zip"));
    let config = write(
        dir.path(),
        "sluice.yaml",
        "limits:\n  package_unpacked: 1MB\nfunctions:\n  bomb:\n    runtime: process\n    package: ./bomb.zip\n",
    );
    let (ok, stderr) = validate(&config);
    assert!(!ok, "a zip bomb must fail validation");
    assert!(
        stderr.contains("functions.bomb.package")
            && stderr.contains("bomb.zip is more than 1000000 bytes unpacked")
            && stderr.contains("limits.package_unpacked"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn validate_refuses_a_package_holding_a_fifo() {
    let dir = tempfile::tempdir().expect("dir");
    let package = dir.path().join("fn");
    std::fs::create_dir(&package).expect("package");
    let fifo =
        std::ffi::CString::new(package.join("pipe").as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
    let config = write(
        dir.path(),
        "sluice.yaml",
        "functions:\n  piped:\n    runtime: process\n    package: ./fn\n",
    );
    let (ok, stderr) = validate(&config);
    assert!(!ok, "a FIFO in a package must fail validation");
    assert!(stderr.contains("pipe is a FIFO"), "{stderr}");
}

/// A bash custom runtime that tries to write into its task root and its `$TMPDIR` (or
/// `/tmp`), and says what happened.
const WRITER: &str = r#"#!/bin/bash
export PATH=/usr/local/bin:/usr/bin:/bin
api="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  headers="$(mktemp)"
  curl -sS -D "$headers" -o /dev/null "$api/invocation/next"
  request_id="$(grep -Fi Lambda-Runtime-Aws-Request-Id "$headers" | tr -d '[:space:]' | cut -d: -f2)"
  rm -f "$headers"
  if echo planted > "$LAMBDA_TASK_ROOT/planted" 2>/dev/null; then root=writable; else root=refused; fi
  tmp="${TMPDIR:-/tmp}"
  if echo mine > "$tmp/$MARK"; then wrote=yes; else wrote=no; fi
  curl -sS -o /dev/null --data-binary "{\"root\": \"$root\", \"tmp\": \"$wrote\", \"tmpdir\": \"$tmp\"}" \
    "$api/invocation/${request_id}/response"
done
"#;

#[test]
fn without_root_a_function_cannot_write_its_unpacked_task_root_and_has_its_own_tmp() {
    let dir = tempfile::tempdir().expect("dir");
    let mark = format!("sluice-mark-{}", std::process::id());
    // Sluice runs as nobody: it must reach and write its own directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let zip_path = dir.path().join("writer.zip");
    {
        let file = std::fs::File::create(&zip_path).expect("zip file");
        let mut writer = zip::ZipWriter::new(file);
        writer
            .start_file(
                "bootstrap",
                zip::write::SimpleFileOptions::default().unix_permissions(0o755),
            )
            .expect("start");
        writer.write_all(WRITER.as_bytes()).expect("write");
        writer.finish().expect("finish");
    }
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let config = write(
        dir.path(),
        "sluice.yaml",
        &format!(
            "state: sqlite://{}/sluice.db\nfunctions:\n  writer:\n    runtime: process\n    package: ./writer.zip\n    timeout: 10s\n    environment: {{MARK: {mark}}}\n",
            data.display()
        ),
    );
    let port = free_port();
    let server = start_as(
        &config,
        port,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    let out = Command::new(SLUICE)
        .args(["invoke", "writer", "--payload", "{}", "--endpoint"])
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .expect("sluice invoke runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON result in: {stdout}")),
    )
    .expect("JSON result");
    assert_eq!(reply["root"], "refused", "{reply}");
    assert_eq!(reply["tmp"], "yes", "{reply}");
    eprintln!("the function saw {reply}");
    // In a user namespace the function has a /tmp of its own; without one, a private TMPDIR.
    let tmpdir = reply["tmpdir"].as_str().expect("tmpdir");
    assert!(
        tmpdir == "/tmp" || tmpdir.starts_with(&data.join("tmp").display().to_string()),
        "a /tmp of its own or a private TMPDIR under the data directory, not {tmpdir}"
    );
    assert!(
        !Path::new("/tmp").join(&mark).exists(),
        "what the function wrote to its /tmp is not in the host's"
    );
    drop(server);
}
