//! The runtimes a function can have: `process` (Lambda Runtime API), `http` and `native`.

pub(crate) mod http;
pub(crate) mod memory;
pub mod native;
pub(crate) mod netns;
pub(crate) mod peer;
/// Function packages live in a crate of their own, so that they can be fuzzed without the rest.
pub use sluice_package as package;
pub(crate) mod process;
pub(crate) mod sandbox;
pub mod user;

use crate::concurrency::Throttle;
use crate::invocation::{Executed, Invocation};

pub(crate) enum Runner {
    Process(process::ProcessRunner),
    Http(http::HttpRunner),
    Native(native::NativeRunner),
}

pub(crate) use sluice_package::remove_orphans;

impl Runner {
    /// Runs one invocation; only a process runtime throttles here, when it cannot get an
    /// execution environment in time.
    pub(crate) async fn invoke(
        &self,
        inv: &Invocation,
        version: &str,
    ) -> Result<Executed, Throttle> {
        match self {
            Self::Process(r) => r.invoke(inv).await,
            Self::Http(r) => Ok(r.invoke(inv).await),
            Self::Native(r) => Ok(r.invoke(inv, version).await),
        }
    }

    pub(crate) fn shutdown(&self) {
        if let Self::Process(r) = self {
            r.shutdown();
        }
    }
}
