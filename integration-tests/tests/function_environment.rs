//! A function's environment is built from its configuration, never inherited from Sluice's
//! own. This binary holds one test only: it changes its own process environment, which is safe
//! only while no other test thread reads it.

mod common;

use common::{Function, Sluice, env_var};
use serde_json::json;
use sluice_integration_tests::unique_name;

const SECRET: &str = "sluice-test-secret-not-for-functions";
const HOST_ACCESS_KEY: &str = "AKIASLUICEHOSTKEY000";
const HOST_SECRET_KEY: &str = "sluice-host-secret-access-key";

#[test]
fn broker_secrets_are_not_inherited_by_functions() {
    // SAFETY: this is the only test in this binary and no other thread has started yet.
    unsafe {
        std::env::set_var("SLUICE_TEST_SECRET", SECRET);
        std::env::set_var("AWS_ACCESS_KEY_ID", HOST_ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", HOST_SECRET_KEY);
        std::env::set_var("AWS_SESSION_TOKEN", SECRET);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let name = unique_name("isolated");
        let sluice =
            Sluice::with(Function::rust(&name).set("environment", "{OWN_SETTING: from-config}"))
                .await;
        let echo = sluice
            .invoke(
                &name,
                &json!({
                    "action": "echo",
                    "env_names": ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "OWN_SETTING"]
                }),
            )
            .await
            .ok_json();
        assert_eq!(env_var(&echo, "SLUICE_TEST_SECRET"), None, "{echo}");
        assert_ne!(
            env_var(&echo, "AWS_ACCESS_KEY_ID").as_deref(),
            Some(HOST_ACCESS_KEY)
        );
        assert_ne!(
            env_var(&echo, "AWS_SECRET_ACCESS_KEY").as_deref(),
            Some(HOST_SECRET_KEY)
        );
        assert_ne!(env_var(&echo, "AWS_SESSION_TOKEN").as_deref(), Some(SECRET));
        // The function's own configuration does reach it.
        assert_eq!(
            env_var(&echo, "OWN_SETTING").as_deref(),
            Some("from-config")
        );
        sluice.shutdown().await;
    });
}
