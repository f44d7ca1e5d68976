//! Memory caps for execution environments: a cgroup per environment where the machine lets
//! Sluice make one (v2 or v1), an rlimit on the data segment otherwise. The cgroup is also
//! how an environment is killed whole: every process in it goes, even one that left the
//! environment's process group.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V1,
    V2,
}

/// How this process caps its environments' memory, decided once at start.
#[derive(Debug, Clone)]
pub(crate) enum MemoryCap {
    Cgroup { version: Version, parent: PathBuf },
    Rlimit,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl MemoryCap {
    /// Finds a cgroup directory this process may create children in and proves it by making
    /// and removing one. Falls back to rlimit when none works.
    pub(crate) fn detect() -> Self {
        let Ok(self_cgroup) = std::fs::read_to_string("/proc/self/cgroup") else {
            return Self::Rlimit;
        };
        let mut candidates = Vec::new();
        for line in self_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if controllers.is_empty() {
                let root = Path::new("/sys/fs/cgroup");
                if root.join("cgroup.controllers").exists() {
                    candidates.push((Version::V2, root.join(rel)));
                }
            } else if controllers.split(',').any(|c| c == "memory") {
                candidates.push((Version::V1, Path::new("/sys/fs/cgroup/memory").join(rel)));
            }
        }
        for (version, dir) in candidates {
            if version == Version::V2 {
                // Children only get a memory controller when the parent delegates it.
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+memory");
            }
            remove_stale(&dir);
            let probe = dir.join(format!("sluice-probe-{}", std::process::id()));
            if std::fs::create_dir(&probe).is_ok() {
                let usable = probe.join(limit_file(version)).exists();
                let _ = std::fs::remove_dir(&probe);
                if usable {
                    return Self::Cgroup {
                        version,
                        parent: dir,
                    };
                }
            }
        }
        Self::Rlimit
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Cgroup { version, parent } => {
                format!("cgroup {version:?} under {}", parent.display())
            }
            Self::Rlimit => "rlimit (RLIMIT_DATA)".to_string(),
        }
    }

    /// Prepares the cap for one environment of `limit_mb` megabytes.
    pub(crate) fn prepare(&self, limit_mb: u32) -> io::Result<EnvMemory> {
        let bytes = u64::from(limit_mb) * 1024 * 1024;
        match self {
            Self::Rlimit => Ok(EnvMemory {
                cgroup: None,
                rlimit_bytes: bytes,
            }),
            Self::Cgroup { version, parent } => {
                let dir = parent.join(format!(
                    "sluice-{}-{}",
                    std::process::id(),
                    SEQ.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir(&dir)?;
                let cgroup = Cgroup {
                    version: *version,
                    dir,
                };
                std::fs::write(cgroup.dir.join(limit_file(*version)), bytes.to_string())?;
                // Without this, a capped environment swaps instead of dying, where swap exists.
                let swap = match version {
                    Version::V1 => ("memory.memsw.limit_in_bytes", bytes.to_string()),
                    Version::V2 => ("memory.swap.max", "0".to_string()),
                };
                if cgroup.dir.join(swap.0).exists() {
                    let _ = std::fs::write(cgroup.dir.join(swap.0), swap.1);
                }
                let procs = CString::new(
                    cgroup
                        .dir
                        .join("cgroup.procs")
                        .as_os_str()
                        .as_encoded_bytes(),
                )
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                Ok(EnvMemory {
                    cgroup: Some((cgroup, procs)),
                    rlimit_bytes: bytes,
                })
            }
        }
    }
}

/// Removes the empty cgroups of Sluice processes that are gone (a crash or `kill -9` leaves
/// them behind, since only the kernel could have removed them at exit).
fn remove_stale(dir: &Path) {
    super::remove_orphans(dir, "sluice-", |path| {
        // Fails harmlessly while processes remain inside.
        let _ = std::fs::remove_dir(path);
    });
}

fn limit_file(version: Version) -> &'static str {
    match version {
        Version::V1 => "memory.limit_in_bytes",
        Version::V2 => "memory.max",
    }
}

#[derive(Debug)]
struct Cgroup {
    version: Version,
    dir: PathBuf,
}

/// The memory cap of one environment; removes its cgroup when dropped.
#[derive(Debug)]
pub(crate) struct EnvMemory {
    cgroup: Option<(Cgroup, CString)>,
    rlimit_bytes: u64,
}

impl EnvMemory {
    /// What the child must do between fork and exec to enter this cap.
    pub(crate) fn child_hook(&self) -> ChildHook {
        ChildHook {
            procs: self.cgroup.as_ref().map(|(_, procs)| procs.clone()),
            rlimit_bytes: self.rlimit_bytes,
        }
    }

    /// The processes in the environment's cgroup; `None` without a cgroup.
    pub(crate) fn procs(&self) -> Option<Vec<u32>> {
        let (cg, _) = self.cgroup.as_ref()?;
        let procs = std::fs::read_to_string(cg.dir.join("cgroup.procs")).ok()?;
        Some(
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect(),
        )
    }

    /// Peak memory of the environment, from the cgroup or the process's high-water mark.
    pub(crate) fn peak_bytes(&self, pid: Option<u32>) -> Option<u64> {
        if let Some((cg, _)) = &self.cgroup {
            let file = match cg.version {
                Version::V1 => "memory.max_usage_in_bytes",
                Version::V2 => "memory.peak",
            };
            if let Some(v) = std::fs::read_to_string(cg.dir.join(file))
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Some(v);
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    /// Sends SIGKILL to every process in the environment's cgroup (`cgroup.kill` on v2, each
    /// pid of `cgroup.procs` otherwise). Without a cgroup there is nothing more to kill than
    /// the process group the caller already signalled.
    pub(crate) fn kill_now(&self) -> bool {
        let Some((cg, _)) = &self.cgroup else {
            return true;
        };
        if cg.version == Version::V2 && std::fs::write(cg.dir.join("cgroup.kill"), "1").is_ok() {
            return self.is_empty();
        }
        let Ok(procs) = std::fs::read_to_string(cg.dir.join("cgroup.procs")) else {
            return true;
        };
        let mut empty = true;
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            empty = false;
            // SAFETY: kill(2) on a pid read from the cgroup; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        empty
    }

    fn is_empty(&self) -> bool {
        let Some((cg, _)) = &self.cgroup else {
            return true;
        };
        std::fs::read_to_string(cg.dir.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty())
    }

    /// Kills every process of the environment and waits (briefly) until the cgroup is empty,
    /// so that it can be removed. Killing again each round catches processes forked between
    /// reading the pid list and the signal.
    pub(crate) async fn kill_all(&self) {
        for _ in 0..100 {
            if self.kill_now() && self.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the kernel's OOM killer has struck inside this environment.
    pub(crate) fn oom_killed(&self) -> bool {
        let Some((cg, _)) = &self.cgroup else {
            return false;
        };
        let file = match cg.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        std::fs::read_to_string(cg.dir.join(file))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }
}

impl Drop for EnvMemory {
    fn drop(&mut self) {
        if let Some((cg, _)) = &self.cgroup {
            // The environment's processes are gone by now; a cgroup with members can't be
            // removed, so a failure here leaves an empty directory behind and nothing more.
            let _ = std::fs::remove_dir(&cg.dir);
        }
    }
}

/// Moves a freshly forked child into its memory cap.
pub(crate) struct ChildHook {
    procs: Option<CString>,
    rlimit_bytes: u64,
}

impl ChildHook {
    /// Runs in the child between fork and exec, so it only makes async-signal-safe calls:
    /// it moves the child into its cgroup, or sets the rlimit.
    pub(crate) fn enter(&self) -> io::Result<()> {
        match &self.procs {
            Some(procs) => {
                // SAFETY: open/write/close on a path prepared before fork; no allocation.
                unsafe {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let mut buf = [0u8; 20];
                    let digits = format_pid(libc::getpid(), &mut buf);
                    let written = libc::write(fd, digits.as_ptr().cast(), digits.len());
                    libc::close(fd);
                    if written < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            }
            None => {
                let limit = libc::rlimit {
                    rlim_cur: self.rlimit_bytes,
                    rlim_max: self.rlimit_bytes,
                };
                // SAFETY: setrlimit is async-signal-safe and the struct lives on the stack.
                if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
        }
    }
}

fn format_pid(pid: i32, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = pid.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_pids_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(format_pid(0, &mut buf), b"0");
        assert_eq!(format_pid(4_194_304, &mut buf), b"4194304");
    }
}
