//! The runtimes a function can have: `process` (Lambda Runtime API), `http` and `native`.

pub(crate) mod http;
pub(crate) mod memory;
pub mod native;
pub mod package;
pub(crate) mod process;

use crate::invocation::{Executed, Invocation};

pub(crate) enum Runner {
    Process(process::ProcessRunner),
    Http(http::HttpRunner),
    Native(native::NativeRunner),
}

impl Runner {
    pub(crate) async fn invoke(&self, inv: &Invocation, version: &str) -> Executed {
        match self {
            Self::Process(r) => r.invoke(inv).await,
            Self::Http(r) => r.invoke(inv).await,
            Self::Native(r) => r.invoke(inv, version).await,
        }
    }

    pub(crate) fn shutdown(&self) {
        if let Self::Process(r) = self {
            r.shutdown();
        }
    }
}
