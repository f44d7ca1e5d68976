//! A filter pattern and a record, as JSON on two lines: parsing the pattern must accept or
//! refuse it with a message, and matching an accepted pattern must answer, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_config::filter::FilterPattern;

fuzz_target!(|data: &[u8]| {
    let (pattern, record) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"{}"[..]),
    };
    let Ok(pattern) = serde_json::from_slice::<serde_json::Value>(pattern) else {
        return;
    };
    let Ok(pattern) = FilterPattern::parse(&pattern) else {
        return;
    };
    if let Ok(record) = serde_json::from_slice::<serde_json::Value>(record) {
        let _ = pattern.matches(&record);
    }
});
