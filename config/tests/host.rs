//! `check_host`: what `sluice run` needs from this machine, checked on real files, zips and
//! directories (including a read-only mount), with the exact messages `sluice validate` prints.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use sluice_config::{check_host, load_file};

/// Writes `sluice.yaml` with `text` into `dir` and returns the host problems, one line each.
fn problems(dir: &Path, text: &str) -> Vec<String> {
    let path = dir.join("sluice.yaml");
    std::fs::write(&path, text).expect("test file");
    let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    check_host(&config)
        .iter()
        .map(|e| e.to_string().replace(&format!("{}/", dir.display()), ""))
        .collect()
}

fn file(path: PathBuf, mode: u32) -> PathBuf {
    std::fs::create_dir_all(path.parent().expect("test file")).expect("test file");
    std::fs::write(&path, "#!/bin/sh\n").expect("test file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("test file");
    path
}

fn zip(path: PathBuf, entries: &[(&str, Option<u32>)]) {
    let mut writer = zip::ZipWriter::new(std::fs::File::create(path).expect("test file"));
    for (name, mode) in entries {
        let mut options = zip::write::SimpleFileOptions::default();
        if let Some(mode) = mode {
            options = options.unix_permissions(*mode);
        }
        writer.start_file(*name, options).expect("test file");
        writer.write_all(b"#!/bin/sh\n").expect("test file");
    }
    writer.finish().expect("test file");
}

const STATE: &str = "state: sqlite://./data/s.db\n";

#[test]
fn a_directory_package_needs_its_command_present_and_executable() {
    let dir = tempfile::tempdir().unwrap();
    file(dir.path().join("ok/bootstrap"), 0o755);
    file(dir.path().join("plain/bootstrap"), 0o644);
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    file(dir.path().join("tool/bin/run"), 0o700);
    let text = format!(
        "{STATE}functions:\n  ok:\n    package: ./ok\n  plain:\n    package: ./plain\n  empty:\n    package: ./empty\n  tool:\n    package: ./tool\n    command: [./bin/run, --fast]\n  typo:\n    package: ./tool\n    command: ./bin/rnu --fast\n  missing:\n    package: ./nowhere\n"
    );
    assert_eq!(
        problems(dir.path(), &text),
        [
            "sluice.yaml:6:14: functions.plain.package: command `./bootstrap`: plain/bootstrap is not executable (chmod +x it)",
            "sluice.yaml:8:14: functions.empty.package: command `./bootstrap` is not in the package empty",
            "sluice.yaml:14:14: functions.typo.command: command `./bin/rnu` is not in the package tool",
        ]
    );
}

#[test]
fn a_bare_command_is_looked_up_on_the_function_path_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("fn")).unwrap();
    // `sh` is on every function's PATH; `sluice-no-such-program` on none; a file of the
    // package is not found by its bare name, as Lambda's runtime would not find it either.
    file(dir.path().join("fn/handler"), 0o755);
    let text = format!(
        "{STATE}functions:\n  shell:\n    package: ./fn\n    command: sh -c 'exit 0'\n  absolute:\n    package: ./fn\n    command: [/bin/sh]\n  unknown:\n    package: ./fn\n    command: sluice-no-such-program\n  bare:\n    package: ./fn\n    command: [handler]\n  gone:\n    package: ./fn\n    command: /opt/sluice-no-such/run\n"
    );
    assert_eq!(
        problems(dir.path(), &text),
        [
            "sluice.yaml:11:14: functions.unknown.command: command `sluice-no-such-program` is not on the function's PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin); to run a file of the package, write `./sluice-no-such-program`",
            "sluice.yaml:14:15: functions.bare.command[0]: command `handler` is not on the function's PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin); to run a file of the package, write `./handler`",
            "sluice.yaml:17:14: functions.gone.command: command `/opt/sluice-no-such/run`: cannot use /opt/sluice-no-such/run: No such file or directory (os error 2)",
        ]
    );
}

#[test]
fn a_zip_package_is_checked_in_its_listing() {
    let dir = tempfile::tempdir().unwrap();
    zip(dir.path().join("ok.zip"), &[("bootstrap", Some(0o755))]);
    zip(dir.path().join("plain.zip"), &[("bootstrap", Some(0o644))]);
    zip(dir.path().join("dos.zip"), &[("bootstrap", None)]);
    zip(
        dir.path().join("nested.zip"),
        &[("bin/run", Some(0o755)), ("app.py", Some(0o644))],
    );
    let text = format!(
        "{STATE}functions:\n  ok:\n    package: ./ok.zip\n  plain:\n    package: ./plain.zip\n  dos:\n    package: ./dos.zip\n  nested:\n    package: ./nested.zip\n    command: ./bin/../bin/run\n  absent:\n    package: ./nested.zip\n  escape:\n    package: ./nested.zip\n    command: ../run\n"
    );
    assert_eq!(
        problems(dir.path(), &text),
        [
            "sluice.yaml:6:14: functions.plain.package: command `./bootstrap` is not executable in the zip package plain.zip: zip it with its execute permission (`chmod +x` before zipping, on a system that records Unix permissions)",
            "sluice.yaml:8:14: functions.dos.package: command `./bootstrap` is not executable in the zip package dos.zip: zip it with its execute permission (`chmod +x` before zipping, on a system that records Unix permissions)",
            "sluice.yaml:13:14: functions.absent.package: command `./bootstrap` is not in the zip package nested.zip",
            "sluice.yaml:16:14: functions.escape.command: command `../run` leaves the zip package nested.zip: name a file inside it",
        ]
    );
}

#[test]
fn a_state_directory_under_a_file_cannot_be_created() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data"), "not a directory").unwrap();
    assert_eq!(
        problems(dir.path(), STATE),
        [
            "sluice.yaml:1:8: state: the state directory data cannot be created: data is not a directory"
        ]
    );
}

#[test]
fn a_state_directory_that_exists_or_can_be_made_passes() {
    let dir = tempfile::tempdir().unwrap();
    assert!(problems(dir.path(), STATE).is_empty());
    std::fs::create_dir(dir.path().join("data")).unwrap();
    assert!(problems(dir.path(), STATE).is_empty());
    // The probe leaves nothing behind.
    assert_eq!(
        std::fs::read_dir(dir.path().join("data")).unwrap().count(),
        0
    );
}

#[test]
fn a_state_directory_on_a_read_only_mount_is_not_writable() {
    // Permission bits do not stop root; a read-only mount stops everyone.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "ro,size=1m",
            "sluice-test",
            data.to_str().unwrap(),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        // Not root: an unwritable directory is one without write permission.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let found = problems(dir.path(), STATE);
    if mounted {
        let _ = std::process::Command::new("umount").arg(&data).status();
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("sluice.yaml:1:8: state: the state directory data is not writable: "),
        "{found:?}"
    );
}
