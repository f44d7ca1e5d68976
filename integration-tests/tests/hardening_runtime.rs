//! Execution environments hold to Lambda's contract under hostile functions and bursts: the
//! task root is read-only and `/tmp` is each environment's own; killing an environment kills
//! everything it started, even what left its process group; a burst of invocations never
//! starts more environments at once than the limits allow, every caller gets a result or a
//! 429, and idle environments are stopped.

mod common;

use std::time::Duration;

use common::{
    Function, Sluice, quoted, shell_function, shell_package, shell_runtime_loop, wait_until,
};
use serde_json::{Value, json};
use sluice_integration_tests::unique_name;

const TASK_ROOT_AND_TMP: &str = r#"
  if echo planted > "$LAMBDA_TASK_ROOT/planted" 2>/dev/null; then root=writable; else root=refused; fi
  if ln -s /dev/zero "$LAMBDA_TASK_ROOT/zero" 2>/dev/null; then link=made; else link=refused; fi
  tmp="${TMPDIR:-/tmp}"
  if echo "$AWS_LAMBDA_FUNCTION_NAME" > "$tmp/mine-$AWS_LAMBDA_FUNCTION_NAME"; then wrote=yes; else wrote=no; fi
  seen="$(ls "$tmp" | grep '^mine-' | tr '\n' ' ')"
  reply="{\"root\": \"$root\", \"link\": \"$link\", \"tmp\": \"$wrote\", \"seen\": \"$seen\"}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_cannot_change_its_task_root_and_has_a_tmp_of_its_own() {
    let dir = Sluice::new_dir();
    let a = unique_name("ro-a");
    let b = unique_name("ro-b");
    let bootstrap = shell_runtime_loop("", TASK_ROOT_AND_TMP);
    let package_a = shell_package(dir.path(), "a", &bootstrap);
    let package_b = shell_package(dir.path(), "b", &bootstrap);
    let sluice = Sluice::start_in(
        dir,
        &[
            shell_function(&a, &package_a).set("timeout", "10s"),
            shell_function(&b, &package_b).set("timeout", "10s"),
        ],
        "",
    )
    .await;

    let first = sluice.invoke(&a, &json!({})).await.ok_json();
    assert_eq!(first["root"], "refused", "{first}");
    assert_eq!(first["link"], "refused", "{first}");
    assert_eq!(
        first["tmp"], "yes",
        "the function can write to /tmp: {first}"
    );
    assert!(!package_a.join("planted").exists());
    assert!(std::fs::symlink_metadata(package_a.join("zero")).is_err());

    let other = sluice.invoke(&b, &json!({})).await.ok_json();
    assert_eq!(other["tmp"], "yes", "{other}");
    assert_eq!(
        other["seen"].as_str().map(str::trim),
        Some(format!("mine-{b}").as_str()),
        "another function sees only its own files in /tmp: {other}"
    );
    // The warm environment keeps its /tmp between invocations, as in Lambda.
    let again = sluice.invoke(&a, &json!({})).await.ok_json();
    assert_eq!(
        again["seen"].as_str().map(str::trim),
        Some(format!("mine-{a}").as_str()),
        "{again}"
    );
    sluice.shutdown().await;
}

/// Whether `pid` is gone (or a zombie waiting for its parent: it runs no more).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

const SETSID_CHILD: &str = r#"
  if [ "$(echo "$event" | grep -c hang)" = 1 ]; then
    sleep 60
  fi
  pidfile="$(mktemp)"
  setsid bash -c 'echo $$ > "$0"; exec sleep 300' "$pidfile" </dev/null >/dev/null 2>&1 &
  while [ ! -s "$pidfile" ]; do sleep 0.05; done
  reply="{\"pid\": $(cat "$pidfile")}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_environment_kills_what_it_started_with_setsid() {
    let dir = Sluice::new_dir();
    let name = unique_name("setsid");
    let package = shell_package(dir.path(), "setsid", &shell_runtime_loop("", SETSID_CHILD));
    let sluice = Sluice::start_in(
        dir,
        &[shell_function(&name, &package).set("timeout", "2s")],
        "",
    )
    .await;

    let started = sluice.invoke(&name, &json!({})).await.ok_json();
    let pid = u32::try_from(started["pid"].as_u64().expect("a pid")).expect("pid");
    assert!(
        !gone(pid),
        "the setsid child runs while its environment does"
    );
    // The next invocation runs past the timeout, which kills the environment.
    let timed_out = sluice.invoke(&name, &json!({"hang": true})).await;
    let error = timed_out.unhandled_error();
    assert_eq!(error["errorType"], "Sandbox.Timedout", "{error}");
    wait_until(
        "the setsid child dies with its environment",
        Duration::from_secs(5),
        async || gone(pid),
    )
    .await;

    // A crash takes its escapees along too, and so does a shutdown.
    let again = sluice.invoke(&name, &json!({})).await.ok_json();
    let pid = u32::try_from(again["pid"].as_u64().expect("a pid")).expect("pid");
    assert!(!gone(pid));
    sluice.shutdown().await;
    wait_until(
        "the setsid child dies at shutdown",
        Duration::from_secs(5),
        async || gone(pid),
    )
    .await;
}

/// A runtime that takes a second to start and records, while starting, how many
/// environments (of any function sharing `COUNT_DIR`) are starting at that moment.
const SLOW_START: &str = r#"
mkdir -p "$COUNT_DIR"
touch "$COUNT_DIR/starting-$AWS_LAMBDA_FUNCTION_NAME-$$"
echo "$(ls "$COUNT_DIR" | grep -c '^starting-') $(ls "$COUNT_DIR" | grep -c "^starting-$AWS_LAMBDA_FUNCTION_NAME-")" >> "$COUNT_DIR/observed"
echo $$ >> "$COUNT_DIR/pids"
sleep 1
rm -f "$COUNT_DIR/starting-$AWS_LAMBDA_FUNCTION_NAME-$$"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_starts_environments_within_the_caps_answers_everyone_and_idle_ones_are_reaped() {
    let dir = Sluice::new_dir();
    let count_dir = dir.path().join("count");
    // The two functions run as users of their own when Sluice is root: the directory they
    // share is open to both.
    std::fs::create_dir(&count_dir).expect("count directory");
    for file in ["observed", "pids"] {
        common::open_to_functions(&count_dir.join(file));
    }
    common::open_to_functions(&count_dir);
    let package = shell_package(dir.path(), "slow", &shell_runtime_loop(SLOW_START, ""));
    let names = [unique_name("burst-a"), unique_name("burst-b")];
    let functions: Vec<Function> = names
        .iter()
        .map(|name| {
            shell_function(name, &package)
                .set("timeout", "3s")
                .set("environment_starts", "3")
                .set(
                    "environment",
                    &format!("{{COUNT_DIR: {}}}", quoted(&count_dir.to_string_lossy())),
                )
        })
        .collect();
    let sluice = Sluice::start_in(
        dir,
        &functions,
        "limits:\n  environment_starts: 4\n  idle_timeout: 2s\n",
    )
    .await;

    const PER_FUNCTION: usize = 150;
    let calls = names.iter().flat_map(|name| {
        let sluice = &sluice;
        (0..PER_FUNCTION).map(move |n| async move { sluice.invoke(name, &json!({ "n": n })).await })
    });
    let answers = futures::future::join_all(calls).await;
    let mut ok = 0;
    let mut throttled = 0;
    for answer in &answers {
        match answer.status {
            200 => {
                answer.ok_json();
                ok += 1;
            }
            429 => {
                let body: Value = answer.json();
                assert_eq!(
                    body["Reason"], "FunctionInvocationRateLimitExceeded",
                    "{body}"
                );
                throttled += 1;
            }
            other => panic!(
                "every call gets a result or a 429, not {other}: {}",
                answer.text()
            ),
        }
    }
    assert_eq!(ok + throttled, 2 * PER_FUNCTION);
    assert!(ok > 0, "the warm environments served part of the burst");

    let observed = std::fs::read_to_string(count_dir.join("observed")).expect("observed");
    let (mut most, mut most_one) = (0, 0);
    for line in observed.lines() {
        let mut numbers = line
            .split_whitespace()
            .map(|n| n.parse::<u32>().expect("count"));
        most = most.max(numbers.next().expect("all"));
        most_one = most_one.max(numbers.next().expect("one"));
    }
    eprintln!(
        "{ok} answered, {throttled} throttled; at most {most} environments starting at once, {most_one} of one function"
    );
    assert!(
        most <= 4,
        "at most limits.environment_starts (4) start at once, saw {most}"
    );
    assert!(
        most_one <= 3,
        "at most environment_starts (3) of one function start at once, saw {most_one}"
    );

    let pids: Vec<u32> = std::fs::read_to_string(count_dir.join("pids"))
        .expect("pids")
        .lines()
        .map(|p| p.trim().parse().expect("pid"))
        .collect();
    assert!(!pids.is_empty());
    wait_until(
        "every idle environment is stopped after limits.idle_timeout",
        Duration::from_secs(10),
        async || pids.iter().all(|pid| gone(*pid)),
    )
    .await;
    // A reaped function starts again on the next call.
    sluice.invoke(&names[0], &json!({})).await.ok_json();
    sluice.shutdown().await;
}
