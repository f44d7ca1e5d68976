//! Hostile and oversized files: loading stays bounded in time and memory, and says what is
//! wrong with the file as a whole (its size, its encoding) before reading any YAML.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_config::{MAX_FILE_SIZE, load_file, parse_str};

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn a_mapping_of_200000_keys_is_checked_for_duplicates_in_linear_time() {
    let mut text = String::from("functions:\n  f:\n    package: ./fn\n    tags:\n");
    for i in 0..200_000 {
        writeln!(text, "      k{i}: v").unwrap();
    }
    text.push_str("      k17: again\n");
    let started = Instant::now();
    let errors = parse_str(&text, "many.yaml", Path::new("/srv"), &no_env).unwrap_err();
    let took = started.elapsed();
    // A scan of the keys seen so far for each key is 2e10 comparisons: it took many minutes
    // here. A set takes a second or two in a debug build, and up to half a minute beside the
    // rest of the suite on a loaded 2-core machine; the bound only tells the two apart.
    assert!(took < Duration::from_secs(180), "took {took:?}");
    let duplicate = errors
        .errors
        .iter()
        .find(|e| e.path == "functions.f.tags.k17")
        .unwrap_or_else(|| panic!("{errors}"));
    assert_eq!(
        duplicate.to_string(),
        "many.yaml:200005:7: functions.f.tags.k17: duplicate key `k17` (first given on line 22)"
    );
}

#[test]
fn a_file_over_the_size_cap_is_refused_naming_its_size_and_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    // Sparse: the size is checked before a byte is read.
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(MAX_FILE_SIZE + 1_000).unwrap();
    let errors = load_file(&path).unwrap_err();
    assert_eq!(
        errors.to_string(),
        format!(
            "{}: the file is 10486760 bytes, over the limit of 10485760 bytes (10 MiB) for a configuration file",
            path.display()
        )
    );
}

#[test]
fn a_file_without_a_size_is_read_only_up_to_the_cap() {
    // /dev/zero reports no size and never ends: the read stops one byte past the cap.
    let errors = load_file(Path::new("/dev/zero")).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "/dev/zero: the file is 10485761 bytes, over the limit of 10485760 bytes (10 MiB) for a configuration file"
    );
}

#[test]
fn a_utf8_byte_order_mark_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bom.yaml");
    std::fs::write(&path, b"\xEF\xBB\xBFstate: sqlite://./s.db\n").unwrap();
    let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.state, "sqlite://./s.db");
}

#[test]
fn a_long_unknown_key_costs_no_quadratic_suggestion() {
    // Suggestions compare the key with each allowed key; a megabyte-long key must not build
    // a megabyte-sized table for each of them.
    // YAML allows a long key only in the explicit `? KEY` form.
    let text = format!(
        "functions:\n  f:\n    package: ./fn\n    ? {}\n    : 1\n",
        "m".repeat(1 << 20)
    );
    let started = Instant::now();
    let errors = parse_str(&text, "long.yaml", Path::new("/srv"), &no_env).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        errors.to_string().contains("unknown field `mmm"),
        "{errors:.200}"
    );
}

#[test]
fn a_long_key_over_a_long_list_is_refused_before_its_paths_fill_memory() {
    // Every item's path repeats the key: 200,000 items under a 1 MiB key would be 200 GB of
    // paths.
    let text = format!("? {}\n: [{}0]\n", "k".repeat(1 << 20), "0,".repeat(200_000));
    let started = Instant::now();
    let errors = parse_str(&text, "paths.yaml", Path::new("/srv"), &no_env).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(errors.errors.len(), 1, "{errors:.300}");
    assert!(
        errors.errors[0]
            .message
            .starts_with("the file has too many nodes, or nodes nested too deep under long keys"),
        "{errors:.300}"
    );
}

#[test]
fn thousands_of_wrong_keys_give_a_thousand_errors_and_a_count() {
    let mut text = String::from("functions:\n  f:\n    package: ./fn\n");
    for i in 0..5_000 {
        writeln!(text, "    wrong{i}: 1").unwrap();
    }
    let errors = parse_str(&text, "wrong.yaml", Path::new("/srv"), &no_env).unwrap_err();
    assert_eq!(errors.errors.len(), 1001);
    assert_eq!(
        errors.errors[1000].to_string(),
        "wrong.yaml: 4000 more errors not listed: only the first 1000 found are"
    );
    assert!(
        errors.errors[0]
            .to_string()
            .starts_with("wrong.yaml:4:5: functions.f.wrong0: unknown field")
    );
}
