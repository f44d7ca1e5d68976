//! What a function may reach, tried as a hostile function would: another environment's
//! Runtime API (its `/next`, a response for its request, its `/init/error`), the Runtime API's
//! own state rules, its package and `/tmp` as a user of its own, Sluice's process, and the
//! network with `network: none`. Tests that need root say so and are skipped without it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Function, Sluice};
use serde_json::{Value, json};
use sluice_integration_tests::unique_name;

/// A bash function whose loop runs `handle` for each event (see `shell_runtime_loop`).
fn shell_package(dir: &Path, name: &str, handle: &str) -> PathBuf {
    common::shell_package(dir, name, &common::shell_runtime_loop("", handle))
}

fn shell_function(name: &str, package: &Path) -> Function {
    common::shell_function(name, package).set("timeout", "10s")
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // `/proc/self` belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn skip_without_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!(
        "\n*** SKIPPED {test}: it needs root (functions run as users of their own and in network namespaces only when Sluice is root) ***\n"
    );
    true
}

/// Reports its Runtime API address, or sleeps `sleep` seconds and answers with its `n`.
const VICTIM: &str = r#"
  sleep_for="$(echo "$event" | sed -n 's/.*"sleep": *\([0-9.]*\).*/\1/p')"
  n="$(echo "$event" | sed -n 's/.*"n": *\([0-9]*\).*/\1/p')"
  [ -n "$sleep_for" ] && sleep "$sleep_for"
  reply="{\"api\": \"$AWS_LAMBDA_RUNTIME_API\", \"request_id\": \"$request_id\", \"n\": \"$n\"}"
"#;

/// Given another environment's Runtime API and a request id, tries what a hostile function
/// would and reports each HTTP status and error type.
const HOSTILE: &str = r#"
  target="$(echo "$event" | sed -n 's/.*"api": *"\([^"]*\)".*/\1/p')"
  rid="$(echo "$event" | sed -n 's/.*"request_id": *"\([^"]*\)".*/\1/p')"
  other="http://$target/2018-06-01/runtime"
  try() { curl -sS -m 3 -o /tmp/body -w '%{http_code}' "$@" 2>/dev/null; }
  next="$(try "$other/invocation/next")"
  next_type="$(sed -n 's/.*"errorType": *"\([^"]*\)".*/\1/p' /tmp/body)"
  response="$(try -X POST --data-binary '{"forged": true}' "$other/invocation/$rid/response")"
  init_error="$(try -X POST --data-binary '{"errorType": "Forged"}' "$other/init/error")"
  listening="$(awk 'NR > 1 && $4 == "0A"' /proc/net/tcp | wc -l)"
  reply="{\"next\": \"$next\", \"next_type\": \"$next_type\", \"response\": \"$response\", \"init_error\": \"$init_error\", \"listening\": \"$listening\"}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_cannot_use_another_environments_runtime_api() {
    let dir = Sluice::new_dir();
    let victim = unique_name("victim");
    let hostile = unique_name("hostile");
    let victim_package = shell_package(dir.path(), "victim", VICTIM);
    let hostile_package = shell_package(dir.path(), "hostile", HOSTILE);
    let sluice = Sluice::start_in(
        dir,
        &[
            shell_function(&victim, &victim_package),
            shell_function(&hostile, &hostile_package),
        ],
        "",
    )
    .await;

    let first = sluice.invoke(&victim, &json!({"n": 1})).await.ok_json();
    let api = first["api"].as_str().expect("api").to_owned();
    // The victim's only environment is busy with a slow invocation while the hostile
    // function tries its Runtime API.
    let slow = {
        let victim = victim.clone();
        let sluice = &sluice;
        async move { sluice.invoke(&victim, &json!({"n": 2, "sleep": 2})).await }
    };
    let attack = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sluice
            .invoke(
                &hostile,
                &json!({"api": api, "request_id": first["request_id"]}),
            )
            .await
    };
    let (slow, attack) = tokio::join!(slow, attack);
    let attack = attack.ok_json();
    assert_eq!(attack["next"], "403", "{attack}");
    assert_eq!(attack["next_type"], "AccessDeniedException", "{attack}");
    assert_eq!(attack["response"], "403", "{attack}");
    assert_eq!(attack["init_error"], "403", "{attack}");
    // Nothing the hostile function did reached the victim: its slow invocation ends with its
    // own answer, and its environment goes on answering.
    let slow = slow.ok_json();
    assert_eq!(slow["n"], "2", "{slow}");
    assert_eq!(slow["api"], api.as_str(), "the same environment answered");
    let after = sluice.invoke(&victim, &json!({"n": 3})).await.ok_json();
    assert_eq!(
        (after["n"].as_str(), after["api"].as_str()),
        (Some("3"), Some(api.as_str()))
    );
    let (_, metrics) = sluice.get("/metrics").await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("sluice_function_runtime_api_refused_total")
                && l.contains(&format!("function=\"{victim}\""))
                && l.contains("reason=\"foreign\"")
        ),
        "refusals are counted under the victim:\n{metrics}"
    );
    sluice.shutdown().await;
}

/// During its own invocation: asks for another event, reports an init error, and answers for
/// a request id that is not its own; then answers properly.
const RULE_BREAKER: &str = r#"
  try() { curl -sS -m 3 -o /tmp/body -w '%{http_code}' "$@" 2>/dev/null; }
  kind() { sed -n 's/.*"errorType": *"\([^"]*\)".*/\1/p' /tmp/body; }
  next="$(try "$api/invocation/next")"; next_type="$(kind)"
  init_error="$(try -X POST --data-binary '{}' "$api/init/error")"; init_type="$(kind)"
  wrong="$(try -X POST --data-binary '{}' "$api/invocation/not-$request_id/response")"; wrong_type="$(kind)"
  reply="{\"next\": \"$next $next_type\", \"init_error\": \"$init_error $init_type\", \"wrong_id\": \"$wrong $wrong_type\"}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_api_refuses_transitions_it_does_not_allow_and_foreign_request_ids() {
    let dir = Sluice::new_dir();
    let name = unique_name("rules");
    let package = shell_package(dir.path(), "rules", RULE_BREAKER);
    let sluice = Sluice::start_in(dir, &[shell_function(&name, &package)], "").await;
    for _ in 0..2 {
        let answer = sluice.invoke(&name, &json!({})).await.ok_json();
        assert_eq!(answer["next"], "403 InvalidStateTransition", "{answer}");
        assert_eq!(
            answer["init_error"], "403 InvalidStateTransition",
            "{answer}"
        );
        assert_eq!(answer["wrong_id"], "400 InvalidRequestID", "{answer}");
    }
    sluice.shutdown().await;
}

/// Reports who the function runs as and what it may touch.
const WHO_AM_I: &str = r#"
  if echo x > "$LAMBDA_TASK_ROOT/planted" 2>/dev/null; then package=writable; else package=refused; fi
  if echo x > /tmp/mine 2>/dev/null; then tmp=writable; else tmp=refused; fi
  if cat "/proc/$PPID/environ" > /dev/null 2>&1; then parent_environ=readable; else parent_environ=refused; fi
  if kill -0 "$PPID" 2>/dev/null; then signal=allowed; else signal=refused; fi
  own_secret="$(env | grep -c SLUICE_ISOLATION_MARKER)"
  reply="{\"uid\": \"$(id -u)\", \"gid\": \"$(id -g)\", \"groups\": \"$(id -G)\", \"tmp_owner\": \"$(stat -c %u /tmp)\", \"package\": \"$package\", \"tmp\": \"$tmp\", \"parent_environ\": \"$parent_environ\", \"signal\": \"$signal\", \"own_secret\": \"$own_secret\", \"pid\": \"$$\"}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_run_as_users_of_their_own_with_a_read_only_package_and_their_own_tmp() {
    if skip_without_root(
        "functions_run_as_users_of_their_own_with_a_read_only_package_and_their_own_tmp",
    ) {
        return;
    }
    let dir = Sluice::new_dir();
    let a = unique_name("user-a");
    let b = unique_name("user-b");
    let named = unique_name("user-nobody");
    let package = shell_package(dir.path(), "who", WHO_AM_I);
    let sluice = Sluice::start_in(
        dir,
        &[
            shell_function(&a, &package),
            shell_function(&b, &package),
            shell_function(&named, &package).set("run_as", "{user: nobody}"),
        ],
        "",
    )
    .await;
    let a_seen = sluice.invoke(&a, &json!({})).await.ok_json();
    let b_seen = sluice.invoke(&b, &json!({})).await.ok_json();
    let named_seen = sluice.invoke(&named, &json!({})).await.ok_json();
    for seen in [&a_seen, &b_seen, &named_seen] {
        assert_ne!(seen["uid"], "0", "{seen}");
        assert_ne!(seen["gid"], "0", "{seen}");
        assert_eq!(
            seen["groups"], seen["gid"],
            "no supplementary groups: {seen}"
        );
        assert_eq!(seen["package"], "refused", "{seen}");
        assert_eq!(seen["tmp"], "writable", "{seen}");
        assert_eq!(seen["tmp_owner"], seen["uid"], "{seen}");
        assert_eq!(seen["parent_environ"], "refused", "{seen}");
        assert_eq!(seen["signal"], "refused", "{seen}");
    }
    assert_ne!(
        a_seen["uid"], b_seen["uid"],
        "each function has a user of its own"
    );
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .expect("id -u nobody");
    assert_eq!(
        named_seen["uid"].as_str(),
        Some(String::from_utf8_lossy(&nobody.stdout).trim()),
        "run_as names the user"
    );
    sluice.shutdown().await;
}

/// Tries a TCP connection to the port in the event and reports whether it opened.
const CONNECT_OUT: &str = r#"
  port="$(echo "$event" | sed -n 's/.*"port": *\([0-9]*\).*/\1/p')"
  if timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then out=connected; else out=refused; fi
  reply="{\"out\": \"$out\"}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_with_network_none_cannot_connect_out_but_answers_its_invocations() {
    if skip_without_root(
        "a_function_with_network_none_cannot_connect_out_but_answers_its_invocations",
    ) {
        return;
    }
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("local server");
    let port = server.local_addr().expect("address").port();
    let dir = Sluice::new_dir();
    let boxed = unique_name("net-none");
    let open = unique_name("net-host");
    let package = shell_package(dir.path(), "connect", CONNECT_OUT);
    let sluice = Sluice::start_in(
        dir,
        &[
            shell_function(&boxed, &package).set("network", "none"),
            shell_function(&open, &package),
        ],
        "",
    )
    .await;
    for _ in 0..2 {
        let answer: Value = sluice
            .invoke(&boxed, &json!({"port": port}))
            .await
            .ok_json();
        assert_eq!(answer["out"], "refused", "{answer}");
    }
    let answer = sluice.invoke(&open, &json!({"port": port})).await.ok_json();
    assert_eq!(
        answer["out"], "connected",
        "the same connection from the host network works"
    );
    sluice.shutdown().await;
}
