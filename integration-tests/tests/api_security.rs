//! The API's own protections as real clients meet them: HTTPS (`api.tls`) for the AWS CLI and
//! boto3 with a CA bundle, and what plain HTTP or a stalled handshake gets; `/metrics` behind
//! `api.metrics_token`; webhooks behind an HMAC signature (computed with Python's `hmac`, as
//! a sender would) or a bearer token.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Function, Sluice, aws_client_env, client_script, quoted, run_program};
use serde_json::{Value, json};
use sluice_integration_tests::{unique_name, venv_bin, venv_python};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// A self-signed certificate for 127.0.0.1 made with the openssl CLI: (cert, key).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// Sluice with `api.tls` on a fresh self-signed certificate; its `url` is `https://…`.
async fn tls_sluice(function: &str, header_read_timeout: &str) -> (Sluice, PathBuf) {
    let dir = Sluice::new_dir();
    let (cert, key) = self_signed(dir.path());
    let yaml = format!(
        "api:\n  header_read_timeout: {header_read_timeout}\n  tls: {{cert: {}, key: {}}}\n",
        quoted(&cert.display().to_string()),
        quoted(&key.display().to_string())
    );
    let mut sluice = Sluice::start_in(dir, &[Function::rust(function)], &yaml).await;
    sluice.url = sluice.url.replacen("http://", "https://", 1);
    (sluice, cert)
}

fn addr(sluice: &Sluice) -> String {
    sluice
        .url
        .rsplit("//")
        .next()
        .expect("host:port")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_and_the_aws_cli_invoke_over_https_with_a_ca_bundle() {
    let name = unique_name("tls");
    let (sluice, cert) = tls_sluice(&name, "10s").await;
    let mut env = aws_client_env(sluice.dir());

    // The AWS CLI, trusting the certificate through --ca-bundle.
    let cli = [
        "lambda",
        "get-function",
        "--function-name",
        &name,
        "--endpoint-url",
        &sluice.url,
        "--ca-bundle",
        cert.to_str().expect("utf-8"),
        "--output",
        "json",
    ];
    let (code, stdout, stderr) = run_program(&venv_bin("aws"), &cli, &env, CLIENT_LIMIT).await;
    assert_eq!(code, 0, "aws lambda get-function over https:\n{stderr}");
    let got: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(got["Configuration"]["FunctionName"], name.as_str());

    // boto3 invoking, trusting it through AWS_CA_BUNDLE.
    env.push(("AWS_CA_BUNDLE".into(), cert.display().to_string()));
    let script = client_script("boto3_invoke.py");
    let payload = json!({"action": "echo", "over": "tls"}).to_string();
    let args = [
        script.to_str().expect("utf-8"),
        "--endpoint",
        &sluice.url,
        "--function",
        &name,
        "--payload",
        &payload,
    ];
    let (code, stdout, stderr) = run_program(&venv_python(), &args, &env, CLIENT_LIMIT).await;
    assert_eq!(code, 0, "boto3 invoke over https:\n{stderr}");
    let out: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["payload"]["event"]["over"], "tls", "{out}");

    // Without the CA the client refuses the server: the certificate is what is checked.
    env.pop();
    let (code, _, stderr) = run_program(&venv_python(), &args, &env, CLIENT_LIMIT).await;
    assert_ne!(code, 0, "boto3 trusted a self-signed certificate");
    assert!(
        stderr.contains("SSL") || stderr.contains("certificate"),
        "{stderr}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_stalled_handshakes_get_nothing_and_the_server_stays_up() {
    let name = unique_name("tls-plain");
    let (sluice, _cert) = tls_sluice(&name, "1s").await;
    let addr = addr(&sluice);

    // Plain HTTP to the TLS port: no HTTP answer, the connection is closed.
    let mut plain = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer))
        .await
        .expect("the server closes a plain-HTTP connection");
    assert!(
        !String::from_utf8_lossy(&answer).contains("ok"),
        "plain HTTP was served: {answer:?}"
    );

    // A client that opens a connection and never starts the handshake is cut off at the
    // header read timeout.
    let mut stalled = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
        .await
        .expect("the stalled handshake is closed within the header read timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // And HTTPS is served as before. (rustls refuses this certificate as a CA used for the
    // server itself, which OpenSSL-based clients accept; the trust path is the AWS clients'
    // test above, this one is about the server staying up.)
    let https = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .build()
        .expect("client");
    let health = https
        .get(format!("{}/healthz", sluice.url))
        .send()
        .await
        .expect("https /healthz");
    assert_eq!(health.status(), 200);
    let metrics = https
        .get(format!("{}/metrics", sluice.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("sluice_api_tls_handshake_errors_total"),
        "the failed handshakes are counted"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_stops_the_start_naming_the_file() {
    let dir = Sluice::new_dir();
    let (cert, _key) = self_signed(dir.path());
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello\n").expect("write");
    let yaml = format!(
        "functions: {{}}\napi:\n  tls: {{cert: {}, key: {}}}\n",
        quoted(&cert.display().to_string()),
        quoted(&not_a_key.display().to_string())
    );
    let config = sluice_config::parse_str(&yaml, "t.yaml", dir.path(), &|_| None)
        .expect("the files exist, so the configuration loads");
    let options = sluice::StartOptions {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    };
    let error = match sluice::start(config, options).await {
        Ok(_) => panic!("started with a file that holds no key"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("cannot read the private key") && error.contains("not-a-key.pem"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_token_and_healthz_does_not() {
    let dir = Sluice::new_dir();
    std::fs::write(dir.path().join("metrics.token"), "m3trics-t0ken\n").expect("token file");
    let sluice = Sluice::start_in(
        dir,
        &[Function::rust(&unique_name("metrics"))],
        "api:\n  metrics_token_file: metrics.token\n",
    )
    .await;
    let get = |auth: Option<&'static str>| {
        let mut request = sluice.http.get(format!("{}/metrics", sluice.url));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move {
            let response = request.send().await.expect("GET /metrics");
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    };
    let (status, body) = get(None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    assert_eq!(get(Some("Bearer m3trics-t0ke")).await.0, 401);
    assert_eq!(get(Some("Bearer m3trics-t0ken-and-more")).await.0, 401);
    assert_eq!(get(Some("m3trics-t0ken")).await.0, 401);
    let (status, body) = get(Some("Bearer m3trics-t0ken")).await;
    assert_eq!(status, 200);
    assert!(body.contains("sluice_api_invalid_requests_total"), "{body}");
    assert_eq!(sluice.get("/healthz").await, (200, "ok".to_owned()));
    sluice.shutdown().await;
}

/// `sha256=<hex>` of `body` under `secret`, by Python's `hmac`, as a webhook sender signs.
async fn python_signature(secret: &str, body: &str) -> String {
    let home = tempfile::tempdir().expect("dir");
    let program = "import hashlib, hmac, sys; print('sha256=' + hmac.new(sys.argv[1].encode(), sys.argv[2].encode(), hashlib.sha256).hexdigest())";
    let (code, stdout, stderr) = run_program(
        &venv_python(),
        &["-c", program, secret, body],
        &aws_client_env(home.path()),
        CLIENT_LIMIT,
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    stdout.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_check_hmac_signatures_and_bearer_tokens_before_invoking() {
    let name = unique_name("hook-auth");
    let dir = Sluice::new_dir();
    std::fs::write(dir.path().join("hook.secret"), "wh-s3cr3t\n").expect("secret file");
    let sources = format!(
        "sources:\n  signed:\n    type: http\n    function: {name}\n    path: /hooks/{name}/signed\n    auth: {{type: hmac_sha256, secret_file: hook.secret}}\n  custom:\n    type: http\n    function: {name}\n    path: /hooks/{name}/custom\n    auth: {{type: hmac_sha256, secret: wh-s3cr3t, header: X-Signature}}\n  bearer:\n    type: http\n    function: {name}\n    path: /hooks/{name}/bearer\n    auth: {{type: bearer, token: b34r3r}}\n"
    );
    let sluice = Sluice::start_in(dir, &[Function::rust(&name)], &sources).await;
    let post = |path: String, body: &'static str, headers: Vec<(&'static str, String)>| {
        let mut request = sluice
            .http
            .post(format!("{}{path}", sluice.url))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        async move {
            let response = request.send().await.expect("POST");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let body = r#"{"action":"echo","ref":"refs/heads/main"}"#;
    let signature = python_signature("wh-s3cr3t", body).await;
    let signed = format!("/hooks/{name}/signed");

    let (status, answer) = post(
        signed.clone(),
        body,
        vec![("x-hub-signature-256", signature.clone())],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["event"]["body"], body,
        "the function got the raw body"
    );
    let bare = signature.trim_start_matches("sha256=").to_owned();
    let (status, _) = post(
        format!("/hooks/{name}/custom"),
        body,
        vec![("x-signature", bare)],
    )
    .await;
    assert_eq!(status, 200, "bare hex in a header of the source's choosing");

    let (status, answer) = post(signed.clone(), body, vec![]).await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("X-Hub-Signature-256")),
        "{answer}"
    );
    let tampered = r#"{"action":"echo","ref":"refs/heads/evil"}"#;
    let (status, answer) = post(
        signed.clone(),
        tampered,
        vec![("x-hub-signature-256", signature.clone())],
    )
    .await;
    assert_eq!(status, 403, "a signature of another body: {answer}");

    let bearer = format!("/hooks/{name}/bearer");
    let (status, _) = post(
        bearer.clone(),
        body,
        vec![("authorization", "Bearer b34r3r".into())],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(post(bearer.clone(), body, vec![]).await.0, 401);
    let (status, answer) = post(bearer, body, vec![("authorization", "Bearer b34r3".into())]).await;
    assert_eq!(status, 403, "{answer}");

    let (_, metrics) = sluice.get("/metrics").await;
    for (source, reason) in [
        ("signed", "missing"),
        ("signed", "invalid"),
        ("bearer", "missing"),
        ("bearer", "invalid"),
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("sluice_http_auth_failures_total{")
                    && l.contains(&format!("source=\"{source}\""))
                    && l.contains(&format!("reason=\"{reason}\""))),
            "no {source}/{reason} failure counted:\n{metrics}"
        );
    }
    sluice.shutdown().await;
}
