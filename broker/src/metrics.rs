//! Metric names in one place, and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const FUNCTION_INVOCATIONS: &str = "sluice_function_invocations_total";
pub const FUNCTION_ERRORS: &str = "sluice_function_errors_total";
pub const FUNCTION_THROTTLES: &str = "sluice_function_throttles_total";
pub const FUNCTION_DURATION: &str = "sluice_function_duration_seconds";
pub const FUNCTION_CONCURRENT_EXECUTIONS: &str = "sluice_function_concurrent_executions";
pub const FUNCTION_COLD_STARTS: &str = "sluice_function_cold_starts_total";
pub const FUNCTION_TIMEOUTS: &str = "sluice_function_timeouts_total";
pub const FUNCTION_ENVIRONMENTS_REAPED: &str = "sluice_function_environments_reaped_total";
pub const ASYNC_EVENTS_RECEIVED: &str = "sluice_async_events_received_total";
pub const ASYNC_EVENTS_DROPPED: &str = "sluice_async_events_dropped_total";
pub const ASYNC_EVENT_AGE: &str = "sluice_async_event_age_seconds";
pub const ASYNC_RETRIES: &str = "sluice_async_retries_total";
pub const DEAD_LETTER_ERRORS: &str = "sluice_dead_letter_errors_total";
pub const DEAD_LETTERS_WRITTEN: &str = "sluice_dead_letters_written_total";
pub const MAPPING_RECORDS: &str = "sluice_mapping_records_total";
pub const MAPPING_BATCHES: &str = "sluice_mapping_batches_total";
pub const MAPPING_RETRIES: &str = "sluice_mapping_retries_total";
pub const MAPPING_BISECTS: &str = "sluice_mapping_bisects_total";
pub const MAPPING_THROTTLES: &str = "sluice_mapping_throttles_total";
pub const MAPPING_READ_ERRORS: &str = "sluice_mapping_read_errors_total";
pub const MAPPING_ITERATOR_AGE: &str = "sluice_mapping_iterator_age_milliseconds";
pub const MAPPING_OFFSET_LAG: &str = "sluice_mapping_offset_lag";
pub const API_INVALID_REQUESTS: &str = "sluice_api_invalid_requests_total";
/// Requests to Lambda's API refused by authentication or authorization, by error code.
pub const API_AUTH_FAILURES: &str = "sluice_api_auth_failures_total";
pub const API_OPEN_CONNECTIONS: &str = "sluice_api_open_connections";
pub const API_HEADER_TIMEOUTS: &str = "sluice_api_header_timeouts_total";
pub const API_ACCEPT_ERRORS: &str = "sluice_api_accept_errors_total";
pub const API_TLS_HANDSHAKE_ERRORS: &str = "sluice_api_tls_handshake_errors_total";
pub const API_CALLER_DISCONNECTS: &str = "sluice_api_caller_disconnects_total";
pub const STATE_ERRORS: &str = "sluice_state_errors_total";
pub const STATE_FAILING: &str = "sluice_state_failing";
pub const AUDIT_DROPPED: &str = "sluice_audit_dropped_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle. `None` when
/// another recorder was installed first (an embedding application's own), in which case
/// Sluice's metrics flow to that one and `/metrics` has nothing to render.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    DURATION_BUCKETS,
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        STATE_ERRORS,
        "Reads and writes the state store refused, by kind (disk_full, unavailable, locked, other)"
    );
    describe_gauge!(
        STATE_FAILING,
        "1 while the state store's last operation failed, 0 once it succeeds again"
    );
    describe_counter!(
        API_TLS_HANDSHAKE_ERRORS,
        "TLS handshakes that failed (plain HTTP to an HTTPS listener, an untrusted certificate)"
    );
    describe_counter!(
        AUDIT_DROPPED,
        "Audit events lost, by where (queue: the writer fell behind; file; store)"
    );
    describe_counter!(
        FUNCTION_INVOCATIONS,
        "Invocations, successful or not, throttles excluded"
    );
    describe_counter!(
        FUNCTION_ERRORS,
        "Invocations that ended in a function error"
    );
    describe_counter!(
        FUNCTION_THROTTLES,
        "Invocations refused by a concurrency limit"
    );
    describe_histogram!(
        FUNCTION_DURATION,
        "Time from start to result of an invocation"
    );
    describe_gauge!(FUNCTION_CONCURRENT_EXECUTIONS, "Invocations running now");
    describe_counter!(FUNCTION_COLD_STARTS, "Execution environments started");
    describe_counter!(
        FUNCTION_TIMEOUTS,
        "Invocations stopped at the function's timeout"
    );
    describe_counter!(
        FUNCTION_ENVIRONMENTS_REAPED,
        "Execution environments stopped after limits.idle_timeout without an invocation"
    );
    describe_counter!(
        ASYNC_EVENTS_RECEIVED,
        "Asynchronous events accepted into the durable queue"
    );
    describe_counter!(
        ASYNC_EVENTS_DROPPED,
        "Asynchronous events given up with no on_failure destination"
    );
    describe_histogram!(
        ASYNC_EVENT_AGE,
        "Age of an asynchronous event when a try of it starts"
    );
    describe_counter!(
        ASYNC_RETRIES,
        "Asynchronous events scheduled for another try after a function error"
    );
    describe_counter!(
        DEAD_LETTER_ERRORS,
        "Failed writes to a destination or dead letter (the event stays queued and is written again)"
    );
    describe_counter!(
        DEAD_LETTERS_WRITTEN,
        "Records written to a destination or dead letter"
    );
    describe_counter!(
        MAPPING_RECORDS,
        "Records of a mapping by final outcome: delivered, filtered, dead_lettered, dropped"
    );
    describe_counter!(
        MAPPING_BATCHES,
        "Invocations of a mapping's function with a batch"
    );
    describe_counter!(MAPPING_RETRIES, "Batches tried again after a failure");
    describe_counter!(MAPPING_BISECTS, "Failed batches split in two");
    describe_counter!(
        MAPPING_THROTTLES,
        "Batch invocations refused by a concurrency limit (tried again, no attempt spent)"
    );
    describe_counter!(MAPPING_READ_ERRORS, "Failed reads from a mapping's source");
    describe_gauge!(
        MAPPING_ITERATOR_AGE,
        "How far behind the newest record of its shard a mapping reads, in milliseconds"
    );
    describe_gauge!(
        MAPPING_OFFSET_LAG,
        "Records between a mapping's committed offset and the end of its partition"
    );
    describe_counter!(
        API_INVALID_REQUESTS,
        "API requests refused before any work, by error: malformed, too large, unsupported"
    );
    describe_counter!(
        API_AUTH_FAILURES,
        "Requests to Lambda's API refused for their signature or by policy, by error code"
    );
    describe_gauge!(
        API_OPEN_CONNECTIONS,
        "Connections a listener is serving now (at api.max_connections, more wait in the backlog)"
    );
    describe_counter!(
        API_HEADER_TIMEOUTS,
        "Connections closed for not sending a request's headers within api.header_read_timeout"
    );
    describe_counter!(
        API_ACCEPT_ERRORS,
        "Failed accepts on a listener (out of file descriptors, say)"
    );
    describe_counter!(
        API_CALLER_DISCONNECTS,
        "Synchronous invocations whose caller went away before the result (the invocation still finishes)"
    );
}

/// Mappings that did not start because their configuration cannot work (an SQS queue whose
/// visibility timeout is shorter than the function's timeout), labelled with a `reason`.
pub const MAPPING_REFUSED: &str = "sluice_mapping_refused_total";
/// Messages whose visibility a running batch could not extend (refused entries of a
/// ChangeMessageVisibilityBatch, or a failed call): another consumer may receive them.
pub const MAPPING_VISIBILITY_EXTENSION_FAILURES: &str =
    "sluice_mapping_visibility_extension_failures_total";
/// 1 while a mapping cannot go on because its on-failure destination refuses its records for
/// good (a missing queue, a record over the size limit): its records stay unacknowledged.
pub const MAPPING_FAILED: &str = "sluice_mapping_failed";
/// Asynchronous events queued for a function the configuration no longer declares; they
/// are kept and delivered once the function is declared again.
pub const ASYNC_ORPHANED_EVENTS: &str = "sluice_async_orphaned_events";

/// Requests refused by an execution environment's Runtime API, labelled with a `reason`:
/// `foreign` (a process that is not the environment's own), `state` (an
/// `InvalidStateTransition`), `request_id` (an `InvalidRequestID`).
pub const RUNTIME_API_REFUSED: &str = "sluice_function_runtime_api_refused_total";
