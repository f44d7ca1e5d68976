//! The test function for the `process` runtime, built on the crates.io `lambda_runtime`
//! exactly as a user's function would be. See `sluice_integration_tests::test_function`.

use lambda_runtime::{Error, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(sluice_integration_tests::test_function)).await
}
