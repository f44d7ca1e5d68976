//! `sluice validate` as an operator uses it before `sluice run`: one report of everything that
//! would stop `run` (the YAML, the packages, the commands, the state directory), and a loud
//! warning for an API that anyone on the network could use.

mod common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use common::{SLUICE, bootstrap, write};

fn sluice(args: &[&str], dir: &Path) -> Output {
    Command::new(SLUICE)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("sluice runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn validate_takes_the_file_with_dash_c_as_run_does() {
    let dir = tempfile::tempdir().expect("dir");
    bootstrap(dir.path(), "#!/bin/sh\n");
    write(
        dir.path(),
        "s.yaml",
        "functions:\n  f:\n    package: ./fn\n",
    );
    for args in [
        &["validate", "-c", "s.yaml"][..],
        &["validate", "--config", "s.yaml"],
        &["validate", "s.yaml"],
    ] {
        let out = sluice(args, dir.path());
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "s.yaml: ok (1 functions, 0 sources)\n",
            "{args:?}"
        );
    }
}

#[test]
fn validate_reports_yaml_package_command_and_state_problems_in_one_report() {
    let dir = tempfile::tempdir().expect("dir");
    bootstrap(dir.path(), "#!/bin/sh\n");
    // A zip whose bootstrap lost its execute bit, as zipping on some systems does.
    let mut zip =
        zip::ZipWriter::new(std::fs::File::create(dir.path().join("f.zip")).expect("zip"));
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    zip.start_file("bootstrap", options).expect("entry");
    zip.write_all(b"#!/bin/sh\n").expect("entry");
    zip.finish().expect("zip");
    std::fs::write(
        dir.path().join("data"),
        "a file where the state directory goes",
    )
    .expect("file");
    std::fs::create_dir(dir.path().join("plain")).expect("dir");
    let script = dir.path().join("plain/run");
    std::fs::write(&script, "#!/bin/sh\n").expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    write(
        dir.path(),
        "s.yaml",
        "state: sqlite://./data/sluice.db
functions:
  missing:
    package: ./nowhere
    timeout: soon
  typo:
    package: ./fn
    command: ./bootsrap
  plain:
    package: ./plain
    command: [./run]
  zipped:
    package: ./f.zip
  interpreter:
    package: ./fn
    command: pyhton3 -m app
sources:
  orders.eu:
    type: schedule
    rate: 5 minutes
    function: typo
",
    );
    let out = sluice(&["validate", "-c", "s.yaml"], dir.path());
    assert!(!out.status.success());
    let root = format!("{}/", dir.path().display());
    assert_eq!(
        stderr(&out).replace(&root, ""),
        "s.yaml:1:8: state: the state directory data cannot be created: data is not a directory
s.yaml:4:14: functions.missing.package: package nowhere does not exist
s.yaml:5:14: functions.missing.timeout: invalid duration `soon`: expected a number with a unit (ms, s, m, h, d), like `30s` or `1m30s`
s.yaml:8:14: functions.typo.command: command `./bootsrap` is not in the package fn
s.yaml:11:15: functions.plain.command[0]: command `./run`: plain/run is not executable (chmod +x it)
s.yaml:13:14: functions.zipped.package: command `./bootstrap` is not executable in the zip package f.zip: zip it with its execute permission (`chmod +x` before zipping, on a system that records Unix permissions)
s.yaml:16:14: functions.interpreter.command: command `pyhton3` is not on the function's PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin); to run a file of the package, write `./pyhton3`
s.yaml:18:3: sources.orders.eu: invalid source name `orders.eu`: use 1 to 64 letters, digits, `-` or `_`
"
    );
}

#[test]
fn an_api_off_loopback_needs_principals_and_auth_none_is_warned_about() {
    let dir = tempfile::tempdir().expect("dir");
    bootstrap(dir.path(), "#!/bin/sh\n");
    write(
        dir.path(),
        "s.yaml",
        "api: { listen: '0.0.0.0:9000' }\nfunctions:\n  f:\n    package: ./fn\n",
    );
    let out = sluice(&["validate", "s.yaml"], dir.path());
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        "s.yaml:1:16: api.listen: the API listens on 0.0.0.0:9000, off loopback, so it takes `auth: sigv4` by default, but `api.principals` declares nobody: nobody could call the API. Declare a principal (access_key_id, secret_access_key, policy), or listen on 127.0.0.1\n"
    );

    // `auth: none` written down is allowed on loopback, with a warning from validate and run.
    let warning = "warning: s.yaml:1:14: api.auth: `auth: none`: every process that can reach 127.0.0.1:9000 may invoke, reconfigure and change every function without signing its requests; use `auth: sigv4` with `principals` to require signatures\n";
    write(
        dir.path(),
        "s.yaml",
        "api: { auth: none }\nfunctions:\n  f:\n    package: ./fn\n",
    );
    let out = sluice(&["validate", "s.yaml"], dir.path());
    assert!(
        out.status.success(),
        "a warning is not an error: {}",
        stderr(&out)
    );
    assert_eq!(stderr(&out), warning);
    write(
        dir.path(),
        "s.yaml",
        "api: { auth: none }\nfunctions:\n  f:\n    package: ./gone\n",
    );
    let out = sluice(&["run", "-c", "s.yaml"], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).starts_with(warning), "{}", stderr(&out));

    // An address given with --listen is the one judged: unauthenticated off loopback, refused
    // before anything binds.
    write(
        dir.path(),
        "s.yaml",
        "functions:\n  f:\n    package: ./gone\n",
    );
    let out = sluice(
        &["run", "-c", "s.yaml", "--listen", "[::]:9000"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).starts_with(
            "--listen: the API would listen on [::]:9000, which is not a loopback address, with `api.auth: none`"
        ),
        "{}",
        stderr(&out)
    );
    let out = sluice(
        &["run", "-c", "s.yaml", "--listen", "127.0.0.1:9000"],
        dir.path(),
    );
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn validate_reports_only_the_file_when_it_is_not_yaml_text() {
    let dir = tempfile::tempdir().expect("dir");
    // The default state directory cannot be made here: not a thing to report about a file
    // that could not be read.
    std::fs::write(dir.path().join("data"), "a file").expect("file");
    write(
        dir.path(),
        "broken.yaml",
        "functions:\n  f:\n   package: ./fn\n  g: [\n",
    );
    let out = sluice(&["validate", "broken.yaml"], dir.path());
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).starts_with("broken.yaml:"), "{}", stderr(&out));

    let utf16: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain("functions: {}\n".encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    std::fs::write(dir.path().join("utf16.yaml"), utf16).expect("file");
    let out = sluice(&["validate", "-c", "utf16.yaml"], dir.path());
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        "utf16.yaml:1:1: the file is UTF-16 (little-endian): it starts with that encoding's byte-order mark at byte offset 0 (line 1); save it as UTF-8\n"
    );
}

#[test]
fn validate_loads_the_tls_key_as_run_would_and_names_a_bad_one() {
    let dir = tempfile::tempdir().expect("dir");
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir.path())
        .output()
        .expect("openssl runs");
    assert!(made.status.success(), "{}", stderr(&made));
    write(dir.path(), "not-a-key.pem", "-----BEGIN NOTHING-----\n");
    write(
        dir.path(),
        "good.yaml",
        "api:\n  tls: {cert: cert.pem, key: key.pem}\nfunctions: {}\n",
    );
    write(
        dir.path(),
        "bad.yaml",
        "api:\n  tls: {cert: cert.pem, key: not-a-key.pem}\nfunctions: {}\n",
    );
    let good = sluice(&["validate", "good.yaml"], dir.path());
    assert!(good.status.success(), "{}", stderr(&good));
    let bad = sluice(&["validate", "bad.yaml"], dir.path());
    assert!(!bad.status.success());
    let report = stderr(&bad);
    assert!(
        report.starts_with("bad.yaml:2:3: api.tls: cannot read the private key ")
            && report.contains("not-a-key.pem (api.tls.key)"),
        "{report}"
    );
}
