//! An `Authorization` header (and, after the first newline, a query string that may carry
//! presigned parameters) on an Invoke request, verified against one known key: every input is
//! refused with one of Lambda's error codes, and none may panic or run long.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let outcome = sluice_sigv4::fuzz_authorization(data);
    // A signature the fuzzer found to verify would be a forgery.
    assert!(outcome.is_err(), "accepted: {outcome:?}");
});
