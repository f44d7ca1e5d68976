//! The runtimes a function can have: `process` (Lambda Runtime API), `http` and `native`.

pub(crate) mod http;
pub(crate) mod memory;
pub mod native;
pub mod package;
pub(crate) mod process;
pub(crate) mod sandbox;

use std::path::Path;

use crate::concurrency::Throttle;
use crate::invocation::{Executed, Invocation};

pub(crate) enum Runner {
    Process(process::ProcessRunner),
    Http(http::HttpRunner),
    Native(native::NativeRunner),
}

/// Removes what a Sluice that is gone left in `dir` (a crash or `kill -9` gives it no chance
/// to clean up): the entries named `<prefix><pid>-…` whose process no longer runs, with
/// `remove`. Entries of running Sluices, and names that do not fit, are left alone.
pub(crate) fn remove_orphans(dir: &Path, prefix: &str, remove: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            remove(&entry.path());
        }
    }
}

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
