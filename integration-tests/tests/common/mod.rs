//! What the integration tests share: a Sluice started in-process from a YAML config, its
//! Invoke API as a plain HTTP client sees it, and the test functions' configurations.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use sluice_integration_tests::{functions_dir, venv_python};
use tempfile::TempDir;

/// How long any single HTTP request to Sluice may take before the test fails instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One function of a test configuration, rendered as YAML under `functions:`.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    settings: BTreeMap<String, String>,
}

/// YAML for a string, quoted so that no path or value is read as anything else.
pub fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// YAML for a list of strings.
pub fn quoted_list(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", items.join(", "))
}

impl Function {
    /// A bare `process` function; add `package`, `command` and the rest with [`Function::set`].
    pub fn process(name: &str) -> Self {
        Function {
            name: name.to_owned(),
            settings: BTreeMap::new(),
        }
        .set("runtime", "process")
    }

    /// A `native` function: its handler is registered with the `sluice::NativeRegistry` given
    /// to [`Sluice::start_native_in`], under the function's name unless `handler` says otherwise.
    pub fn native(name: &str) -> Self {
        Function {
            name: name.to_owned(),
            settings: BTreeMap::new(),
        }
        .set("runtime", "native")
    }

    /// `fn-rust` (see `sluice_integration_tests::test_function`), with an empty package.
    pub fn rust(name: &str) -> Self {
        Self::process(name)
            .set("package", EMPTY_PACKAGE)
            .set("handler", "bootstrap")
            .set("command", &quoted_list(&[env!("CARGO_BIN_EXE_fn-rust")]))
    }

    /// A Python function under `integration-tests/functions/<dir>` run by awslambdaric from the
    /// test virtualenv.
    pub fn python(name: &str, dir: &str) -> Self {
        Self::python_at(name, &functions_dir().join(dir))
    }

    /// A Python package at `package` (with `app.py`) run by awslambdaric from the test
    /// virtualenv.
    pub fn python_at(name: &str, package: &Path) -> Self {
        let python = venv_python();
        Self::process(name)
            .set("package", &quoted(&package.to_string_lossy()))
            .set("handler", "app.handler")
            .set(
                "command",
                // -B: no __pycache__ written into the source tree.
                &quoted_list(&[
                    &python.to_string_lossy(),
                    "-B",
                    "-m",
                    "awslambdaric",
                    "app.handler",
                ]),
            )
    }

    /// `integration-tests/functions/shell`: a bash and curl bootstrap, started the default way.
    pub fn shell(name: &str) -> Self {
        let package = functions_dir().join("shell");
        Self::process(name)
            .set("package", &quoted(&package.to_string_lossy()))
            .set("handler", "function.handler")
    }

    /// Sets `key` to a YAML value (flow style: `1s`, `[a, b]`, `{A: "1"}`).
    pub fn set(mut self, key: &str, yaml_value: &str) -> Self {
        self.settings.insert(key.to_owned(), yaml_value.to_owned());
        self
    }

    fn yaml(&self) -> String {
        let mut out = format!("  {}:\n", quoted(&self.name));
        for (key, value) in &self.settings {
            out.push_str(&format!("    {key}: {value}\n"));
        }
        out
    }
}

/// Replaced by an empty directory inside the test's own temporary directory.
const EMPTY_PACKAGE: &str = "empty-package";

/// A Sluice running in this process on an ephemeral port, with its own data directory.
pub struct Sluice {
    running: Option<sluice::Running>,
    pub url: String,
    pub http: reqwest::Client,
    pub yaml: String,
    dir: TempDir,
}

impl Sluice {
    /// Starts Sluice with these functions, or panics saying why it did not start.
    pub async fn start(functions: &[Function]) -> Sluice {
        Self::start_with(functions, "").await
    }

    /// Starts Sluice with these functions and more top-level YAML (`dead_letters:`,
    /// `sources:`, `concurrency:`), whose relative paths are under [`Sluice::dir`].
    pub async fn start_with(functions: &[Function], extra_yaml: &str) -> Sluice {
        Self::start_in(Self::new_dir(), functions, extra_yaml).await
    }

    /// A directory for [`Sluice::start_in`], to put packages or state into before the start.
    pub fn new_dir() -> TempDir {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir_all(dir.path().join(EMPTY_PACKAGE)).expect("empty package directory");
        std::fs::create_dir_all(dir.path().join("data")).expect("data directory");
        dir
    }

    /// The state file of a Sluice started in `dir`.
    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join("data/sluice.db")
    }

    /// Starts Sluice in `dir` (from [`Sluice::new_dir`]), on the state already there.
    pub async fn start_in(dir: TempDir, functions: &[Function], extra_yaml: &str) -> Sluice {
        Self::start_native_in(dir, functions, extra_yaml, sluice::NativeRegistry::new()).await
    }

    /// [`Sluice::start_in`] with handlers for the functions with `runtime: native`.
    pub async fn start_native_in(
        dir: TempDir,
        functions: &[Function],
        extra_yaml: &str,
        native: sluice::NativeRegistry,
    ) -> Sluice {
        let mut yaml = format!(
            "state: {}\nfunctions:\n",
            quoted(&format!(
                "sqlite://{}",
                Self::state_file(dir.path()).display()
            ))
        );
        for function in functions {
            yaml.push_str(&function.yaml());
        }
        yaml.push_str(extra_yaml);
        let config = sluice_config::parse_str(&yaml, "test.yaml", dir.path(), &|key| {
            std::env::var(key).ok()
        })
        .unwrap_or_else(|errors| {
            panic!("the test configuration does not load:\n{errors}\n---\n{yaml}")
        });
        let options = sluice::StartOptions {
            listen: Some("127.0.0.1:0".parse().expect("socket address")),
            data_dir: Some(dir.path().join("data")),
            native,
            ..Default::default()
        };
        let running = sluice::start(config, options)
            .await
            .unwrap_or_else(|error| panic!("sluice does not start: {error}\n---\n{yaml}"));
        let url = format!("http://{}", running.api_addr());
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("HTTP client");
        Sluice {
            running: Some(running),
            url,
            http,
            yaml,
            dir,
        }
    }

    /// Stops this Sluice and starts another on the same directory and state, with this
    /// configuration (on a new port: use the new `url`).
    pub async fn restart(mut self, functions: &[Function], extra_yaml: &str) -> Sluice {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        Self::start_in(self.dir, functions, extra_yaml).await
    }

    /// Starts Sluice with one function.
    pub async fn with(function: Function) -> Sluice {
        Self::start(&[function]).await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn invocations_url(&self, function: &str) -> String {
        format!("{}/2015-03-31/functions/{function}/invocations", self.url)
    }

    /// A synchronous invoke with no extra headers.
    pub async fn invoke(&self, function: &str, payload: &Value) -> Invoked {
        self.invoke_with(function, payload, &[]).await
    }

    /// An invoke with extra headers (`X-Amz-Invocation-Type`, `X-Amz-Log-Type`, …).
    pub async fn invoke_with(
        &self,
        function: &str,
        payload: &Value,
        headers: &[(&str, &str)],
    ) -> Invoked {
        self.invoke_raw(function, payload.to_string().into_bytes(), headers)
            .await
    }

    /// An invoke with a body that need not be JSON.
    pub async fn invoke_raw(
        &self,
        function: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Invoked {
        let mut request = self.http.post(self.invocations_url(function)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let started = Instant::now();
        let response = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("invoke {function}: {error}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|error| panic!("invoke {function}: reading the body: {error}"))
            .to_vec();
        Invoked {
            function: function.to_owned(),
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        }
    }

    /// GET a path on the API address; returns the status and the body as text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {path}: {error}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, text)
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// One Invoke API response.
#[derive(Debug)]
pub struct Invoked {
    pub function: String,
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl Invoked {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "invoke {}: body is not JSON ({error}): {}",
                self.function,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    }

    pub fn function_error(&self) -> Option<String> {
        self.header("x-amz-function-error")
    }

    /// Asserts a 200 without a function error and returns the result as JSON.
    #[track_caller]
    pub fn ok_json(&self) -> Value {
        assert_eq!(
            (self.status, self.function_error()),
            (200, None),
            "invoke {} should succeed; body: {}",
            self.function,
            self.text()
        );
        self.json()
    }

    /// Asserts a 200 with `X-Amz-Function-Error: Unhandled` and returns the error body.
    #[track_caller]
    pub fn unhandled_error(&self) -> Value {
        assert_eq!(
            (self.status, self.function_error().as_deref()),
            (200, Some("Unhandled")),
            "invoke {} should report a function error; body: {}",
            self.function,
            self.text()
        );
        let error = self.json();
        assert!(
            error.get("errorType").and_then(Value::as_str).is_some()
                && error.get("errorMessage").and_then(Value::as_str).is_some(),
            "a function error has errorType and errorMessage: {error}"
        );
        error
    }

    /// The decoded `X-Amz-Log-Result` header.
    #[track_caller]
    pub fn log_result(&self) -> String {
        let encoded = self.header("x-amz-log-result").unwrap_or_else(|| {
            panic!(
                "invoke {}: no X-Amz-Log-Result header; headers: {:?}",
                self.function, self.headers
            )
        });
        let bytes = BASE64
            .decode(encoded.as_bytes())
            .unwrap_or_else(|error| panic!("X-Amz-Log-Result is not base64 ({error}): {encoded}"));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// `field` of a JSON object as a string, or a panic naming it.
#[track_caller]
pub fn str_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string `{field}` in {value}"))
}

/// The process id `echo` reported.
#[track_caller]
pub fn pid(echo: &Value) -> u64 {
    echo.get("pid")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no pid in {echo}"))
}

/// The value of an environment variable `echo` reported (`None` when unset).
#[track_caller]
pub fn env_var(echo: &Value, name: &str) -> Option<String> {
    let env = echo
        .get("env")
        .unwrap_or_else(|| panic!("no env in {echo}"));
    assert!(
        env.get(name).is_some(),
        "{name} was not asked for; add it to env_names"
    );
    env.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// Asserts that `arn` is `arn:aws:lambda:<region>:<12-digit account>:function:<function>`.
#[track_caller]
pub fn assert_function_arn(arn: &str, function: &str) {
    let parts: Vec<&str> = arn.split(':').collect();
    assert!(
        parts.len() == 7
            && parts[..3] == ["arn", "aws", "lambda"]
            && !parts[3].is_empty()
            && parts[4].len() == 12
            && parts[4].chars().all(|c| c.is_ascii_digit())
            && parts[5] == "function"
            && parts[6] == function,
        "`{arn}` is not arn:aws:lambda:<region>:<account>:function:{function}"
    );
}

/// Asserts that `id` is a UUID, as Lambda request ids are.
#[track_caller]
pub fn assert_request_id(id: &str) {
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "request id `{id}` is not a UUID"
    );
}

/// Environment for a client subprocess (boto3, the AWS CLI): dummy credentials, no profile,
/// no instance metadata, nothing from the developer's own AWS setup.
pub fn aws_client_env(home: &Path) -> Vec<(String, String)> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    [
        ("PATH", path.as_str()),
        ("HOME", &home.to_string_lossy()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_REGION", "us-east-1"),
        (
            "AWS_CONFIG_FILE",
            &home.join("aws-config").to_string_lossy(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            &home.join("aws-credentials").to_string_lossy(),
        ),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_PAGER", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Runs a program to completion within `limit`; returns (exit code, stdout, stderr).
pub async fn run_program(
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    limit: Duration,
) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .kill_on_drop(true);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} did not finish within {limit:?}",
                program.display()
            )
        })
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A client script under `integration-tests/clients`.
pub fn client_script(name: &str) -> PathBuf {
    sluice_integration_tests::clients_dir().join(name)
}

/// The records of a JSON Lines file (a `file` dead letter, a recorder's log); none when the
/// file does not exist yet.
pub fn json_lines(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|error| {
                    panic!("{}: not JSON ({error}): {line}", path.display())
                })
            })
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("cannot read {}: {error}", path.display()),
    }
}

/// Waits until `path` holds at least `count` JSON lines, and returns them all.
pub async fn wait_for_lines(path: &Path, count: usize, limit: Duration) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let lines = json_lines(path);
        if lines.len() >= count {
            return lines;
        }
        assert!(
            started.elapsed() < limit,
            "{} has {} of {count} expected lines after {limit:?}: {lines:?}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Python handler that appends what it is given to the file named by `RECORD_TO` and
/// answers as a Function URL handler does. An event with `fail` raises instead.
const RECORDER: &str = r#"import json, os


def handler(event, context):
    with open(os.environ["RECORD_TO"], "a") as f:
        f.write(json.dumps({
            "event": event,
            "request_id": context.aws_request_id,
            "invoked_function_arn": context.invoked_function_arn,
            "version": os.environ.get("AWS_LAMBDA_FUNCTION_VERSION"),
        }) + "\n")
    event = event if isinstance(event, dict) else {}
    if event.get("fail"):
        raise RuntimeError(event["fail"])
    return {
        "statusCode": 201,
        "headers": {"content-type": "application/json", "x-recorder": "yes"},
        "body": json.dumps({
            "method": event.get("requestContext", {}).get("http", {}).get("method"),
            "path": event.get("rawPath"),
            "body": event.get("body"),
        }),
    }
"#;

/// Writes `bootstrap` (a bash custom runtime, see [`shell_runtime_loop`]) into a new package
/// directory under `dir`.
#[allow(dead_code)]
pub fn shell_package(dir: &Path, name: &str, bootstrap: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let package = dir.join(name);
    std::fs::create_dir_all(&package).expect("package directory");
    let path = package.join("bootstrap");
    std::fs::write(&path, bootstrap).expect("bootstrap");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    package
}

/// A `process` function running the bash bootstrap in `package`.
#[allow(dead_code)]
pub fn shell_function(name: &str, package: &Path) -> Function {
    Function::process(name)
        .set("package", &quoted(&package.to_string_lossy()))
        .set("handler", "function.handler")
}

/// The loop of a bash custom runtime: `init` runs once; `handle` is bash that reads `$event` and sets
/// `$reply` (a JSON document).
#[allow(dead_code)]
pub fn shell_runtime_loop(init: &str, handle: &str) -> String {
    format!(
        r#"#!/bin/bash
set -u
export PATH=/usr/local/bin:/usr/bin:/bin
api="http://${{AWS_LAMBDA_RUNTIME_API}}/2018-06-01/runtime"
{init}
while true; do
  headers="$(mktemp)"
  event="$(curl -sS -D "$headers" "$api/invocation/next")"
  request_id="$(grep -Fi Lambda-Runtime-Aws-Request-Id "$headers" | tr -d '[:space:]' | cut -d: -f2)"
  rm -f "$headers"
  reply='{{}}'
{handle}
  curl -sS -o /dev/null -H 'Content-Type: application/json' \
    --data-binary "$reply" "$api/invocation/${{request_id}}/response"
done
"#
    )
}

/// Opens `path` (a file, created empty when missing) to functions: when Sluice runs as root
/// they run as users of their own, who need to write it and to search the test's temporary
/// directories leading to it. Only directories under the system's temporary directory are
/// opened (search only, `o+x`).
#[allow(dead_code)] // not every test binary writes from a function
pub fn open_to_functions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if !path.exists() {
        std::fs::write(path, "").expect("file for functions");
    }
    let mode = if path.is_dir() { 0o777 } else { 0o666 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    let temp = std::env::temp_dir();
    for dir in path.ancestors().skip(1) {
        if !dir.starts_with(&temp) || dir == temp {
            break;
        }
        let current = std::fs::metadata(dir)
            .expect("directory")
            .permissions()
            .mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(current | 0o001))
            .expect("chmod");
    }
}

/// Writes the recorder package (see [`RECORDER`]) under `dir` and returns a function running
/// it that records to `record_to`.
pub fn recorder(name: &str, dir: &Path, record_to: &Path) -> Function {
    let package = dir.join(format!("recorder-{name}"));
    std::fs::create_dir_all(&package).expect("recorder package directory");
    std::fs::write(package.join("app.py"), RECORDER).expect("recorder app.py");
    open_to_functions(record_to);
    Function::python_at(name, &package).set(
        "environment",
        &format!("{{RECORD_TO: {}}}", quoted(&record_to.to_string_lossy())),
    )
}

/// The moto_server the AWS tests share (`scripts/test` starts one and sets SLUICE_TEST_MOTO).
pub fn moto_url() -> String {
    std::env::var("SLUICE_TEST_MOTO").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_MOTO is not set: these tests need a moto_server. Run them with \
             scripts/test, which starts one, or start `moto_server -H 127.0.0.1 -p PORT` and set \
             SLUICE_TEST_MOTO=http://127.0.0.1:PORT (with AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY and AWS_REGION set)"
        )
    })
}

/// Starts Sluice in-process on the state store at `state` (`sqlite://…` or `postgres://…`),
/// with `yaml` (functions, sources, dead letters) after the `state:` line and its packages
/// under `data_dir`; panics saying why it did not start.
pub async fn start_on_state(
    state: &str,
    data_dir: &Path,
    yaml: &str,
    native: sluice::NativeRegistry,
) -> sluice::Running {
    let yaml = format!("state: {}\n{yaml}", quoted(state));
    let config =
        sluice_config::parse_str(&yaml, "test.yaml", data_dir, &|key| std::env::var(key).ok())
            .unwrap_or_else(|errors| {
                panic!("the test configuration does not load:\n{errors}\n---\n{yaml}")
            });
    let options = sluice::StartOptions {
        listen: Some("127.0.0.1:0".parse().expect("socket address")),
        data_dir: Some(data_dir.to_path_buf()),
        native,
        ..Default::default()
    };
    sluice::start(config, options)
        .await
        .unwrap_or_else(|error| panic!("sluice does not start: {error}\n---\n{yaml}"))
}

/// The PostgreSQL server the test command provides (`SLUICE_TEST_POSTGRES`, default the local
/// trust-auth server), as the URL of its administrative database.
fn postgres_admin_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A new, empty database on the test PostgreSQL server, as a `postgres://` URL.
pub async fn new_postgres_database() -> String {
    let admin_url = postgres_admin_url();
    let db = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} (run scripts/test): {e}"));
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .expect("create the test database");
    admin.close().await;
    match admin_url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{db}"),
        None => panic!("no database in {admin_url}"),
    }
}

/// Drops a database [`new_postgres_database`] made, closing what is still connected to it.
pub async fn drop_postgres_database(url: &str) {
    let Some((_, db)) = url.rsplit_once('/') else {
        return;
    };
    if let Ok(admin) = sqlx::PgPool::connect(&postgres_admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await;
        admin.close().await;
    }
}

/// Waits until `done` answers true, checking every 20 ms; fails the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Sluice running in-process on a SQLite state of its own, whose checkpoints the test reads.
pub struct StatefulSluice {
    pub running: sluice::Running,
    store: Box<dyn sluice::state::StateStore>,
    dir: TempDir,
}

impl StatefulSluice {
    /// Starts Sluice with `yaml` (functions, sources, dead letters) on a new state.
    pub async fn start(yaml: &str, native: sluice::NativeRegistry) -> StatefulSluice {
        let dir = tempfile::tempdir().expect("state directory");
        Self::start_in(dir, yaml, native).await
    }

    /// Starts Sluice on the state in `dir` (from [`StatefulSluice::stop`]).
    pub async fn start_in(
        dir: TempDir,
        yaml: &str,
        native: sluice::NativeRegistry,
    ) -> StatefulSluice {
        let state = format!("sqlite://{}", dir.path().join("state.db").display());
        let running = start_on_state(&state, dir.path(), yaml, native).await;
        let store =
            sluice::state::open_with(&state, Path::new("."), sluice::state::OpenOptions::INSPECT)
                .await
                .expect("open the state");
        StatefulSluice {
            running,
            store,
            dir,
        }
    }

    /// Stops it gracefully and hands back its directory, to start another on the same state.
    pub async fn stop(self) -> TempDir {
        self.running.shutdown().await;
        self.dir
    }

    pub async fn checkpoint(&self, source: &str, shard: &str) -> Option<sluice::state::Checkpoint> {
        self.store
            .checkpoint(source, shard)
            .await
            .expect("read a checkpoint")
    }

    /// Waits until each shard's checkpoint is at the sequence number `last` gives for it.
    pub async fn wait_for_checkpoints(
        &self,
        source: &str,
        last: &BTreeMap<String, String>,
        limit: Duration,
    ) {
        wait_until(
            &format!("the checkpoints reach {last:?}"),
            limit,
            async || {
                for (shard, seq) in last {
                    let at = self
                        .checkpoint(source, shard)
                        .await
                        .and_then(|c| c.sequence);
                    if at.as_deref() != Some(seq.as_str()) {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    /// Its Prometheus metrics, as `GET /metrics` renders them.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.running.api_addr());
        reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("HTTP client")
            .get(url)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics")
    }
}

impl Sluice {
    /// The value of the first sample of `metric` whose labels include every one of `labels`
    /// (`source="orders"`), or 0 when there is none.
    pub async fn metric(&self, metric: &str, labels: &[&str]) -> f64 {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics: {text}");
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .find(|l| labels.iter().all(|label| l.contains(label)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// What Sluice logs, captured for a test to read. The capture holds on the thread that
/// called [`Logs::capture`], so a test using it runs on a current-thread runtime, where every
/// task of the Sluice it starts runs too.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures this thread's logs until the returned guard is dropped.
    pub fn capture(&self) -> Box<dyn std::any::Any> {
        use tracing_subscriber::util::SubscriberInitExt;
        let writer = self.clone();
        let guard = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
            .set_default();
        Box::new(guard)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Waits until a logged line contains `text` and returns that line; fails after `limit`.
    pub async fn wait_for_line(&self, text: &str, limit: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self.text().lines().find(|l| l.contains(text)) {
                return line.to_string();
            }
            assert!(
                started.elapsed() < limit,
                "nothing logged {text:?} within {limit:?}:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Makes Lambda API calls through boto3 (`clients/boto3_calls.py`), one after the other, and
/// returns one result per call: the response, or `{"exception": code, …}` when it raised.
pub async fn boto3_calls(sluice: &Sluice, calls: &[Value]) -> Vec<Value> {
    client_calls("boto3_calls.py", sluice, calls).await
}

/// Runs the client script `name` (under `integration-tests/clients`, taking `--endpoint` and
/// `--calls JSON`) against `sluice` and returns the JSON list it prints, one result per call.
pub async fn client_calls(name: &str, sluice: &Sluice, calls: &[Value]) -> Vec<Value> {
    let script = client_script(name);
    let calls = Value::from(calls.to_vec()).to_string();
    let args = [
        script.to_str().expect("utf-8 path"),
        "--endpoint",
        &sluice.url,
        "--calls",
        &calls,
    ];
    let env = aws_client_env(sluice.dir());
    let (code, stdout, stderr) =
        run_program(&venv_python(), &args, &env, Duration::from_secs(90)).await;
    assert_eq!(code, 0, "{name} failed:\n{stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("{name} printed no JSON list ({error}): {stdout}\n{stderr}"))
}
