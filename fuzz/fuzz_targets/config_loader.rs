//! Any bytes as a configuration file: loading must answer with a configuration or with errors,
//! never panic, and stay within its time and memory bounds (libFuzzer's `-rss_limit_mb` and
//! `-timeout` catch the rest).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A fixed environment, so that `${VAR}` substitution is exercised and a crash reproduces.
    let env = |name: &str| match name {
        "EMPTY" => Some(String::new()),
        "PORT" => Some("9000".to_owned()),
        "NESTED" => Some("${PORT}".to_owned()),
        _ => None,
    };
    let _ = sluice_config::parse_bytes(data, "fuzz.yaml", Path::new("/srv/sluice"), &env);
});
