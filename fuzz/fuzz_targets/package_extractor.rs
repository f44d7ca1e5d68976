//! Any bytes as a `.zip` package: preparing it must unpack it within the limits or refuse it
//! with an error, never panic, never write outside its own directory, and stay within its time
//! and memory bounds (libFuzzer's `-rss_limit_mb` and `-timeout` catch the rest).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice_package::{SizeLimits, prepare};

/// Small limits, so that a bomb is refused quickly rather than filling the disk.
const LIMITS: SizeLimits = SizeLimits {
    zipped: 1 << 20,
    unpacked: 4 << 20,
};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let package = dir.path().join("package.zip");
    if std::fs::write(&package, data).is_err() {
        return;
    }
    let unpack_root = dir.path().join("packages");
    if let Ok(root) = prepare(&package, LIMITS, &unpack_root) {
        assert!(
            root.starts_with(&unpack_root),
            "unpacked outside its directory: {}",
            root.display()
        );
    }
    escaped(dir.path(), &unpack_root);
});

/// Nothing but the package and its unpack directory may exist in the scratch directory.
fn escaped(scratch: &Path, unpack_root: &Path) {
    if let Ok(entries) = std::fs::read_dir(scratch) {
        for entry in entries.flatten() {
            let path = entry.path();
            assert!(
                path == unpack_root || path.file_name().is_some_and(|n| n == "package.zip"),
                "the package wrote {}",
                path.display()
            );
        }
    }
}
