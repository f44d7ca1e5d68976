//! The example configurations under `examples/` stay valid: `sluice validate` accepts every
//! `examples/*/sluice.yaml`, and there is one for each source type the schema knows
//! (`examples/<type>/sluice.yaml`, with a dead letter), so that a change to the
//! schema that breaks an example fails here rather than in a reader's hands.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::SLUICE;
use sluice_config::SOURCE_TYPES;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The `sluice.yaml` of every folder under `examples/`.
fn example_configs() -> Vec<PathBuf> {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("the examples folder")
        .map(|entry| entry.expect("an examples entry").path().join("sluice.yaml"))
        .filter(|config| config.is_file())
        .collect();
    configs.sort();
    configs
}

#[test]
fn every_example_configuration_validates() {
    let configs = example_configs();
    assert!(
        configs.len() > SOURCE_TYPES.len(),
        "too few examples: {configs:?}"
    );
    let mut failures = Vec::new();
    for config in &configs {
        // The examples' own defaults must do: nothing from the caller's environment.
        let out = Command::new(SLUICE)
            .arg("validate")
            .arg(config)
            .env_remove("RABBITMQ_USER")
            .env_remove("RABBITMQ_PASSWORD")
            .output()
            .expect("validate runs");
        if !out.status.success() {
            failures.push(format!(
                "{}:\n{}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_source_type_has_an_example_with_a_dead_letter() {
    for source_type in SOURCE_TYPES {
        let config = examples_dir().join(source_type).join("sluice.yaml");
        let text = std::fs::read_to_string(&config)
            .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        assert!(
            text.contains(&format!("type: {source_type}")),
            "{} declares no `type: {source_type}` source",
            config.display()
        );
        assert!(
            text.contains("\ndead_letters:") && text.contains("on_failure:"),
            "{} shows no dead letter",
            config.display()
        );
        assert!(
            text.starts_with('#'),
            "{} opens with no comment saying what to start first",
            config.display()
        );
    }
}
