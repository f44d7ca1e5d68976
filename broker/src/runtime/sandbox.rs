//! What an execution environment may touch of the file system: as in Lambda, the task root
//! (`$LAMBDA_TASK_ROOT`) is read-only and `/tmp` is the environment's own.
//!
//! Sluice often runs as root, and root ignores file modes. So where Sluice may make mount
//! namespaces (probed once; as root, or without root inside a user namespace of its own),
//! each environment gets its own: mounts are made private, a tmpfs of `ephemeral_storage`
//! bytes covers `/tmp`, the task root is bound read-only over itself, and the function is left
//! without the capability to undo that (CAP_SYS_ADMIN dropped from the bounding set as root;
//! none at all after exec in a user namespace). A root function still has the rest of the
//! host's file system as any root process does; the task root and `/tmp` are what this
//! isolates. The tmpfs's pages count against the environment's memory cgroup.
//!
//! A function that runs as a user of its own (see `user`) may be unable to reach its program
//! or its task root: they often lie under a directory only root may search (`/root`, a
//! private temporary directory). Such a directory is covered, in the environment's namespace
//! only, by an empty tmpfs holding just the way through: the next directory on the path,
//! bound back from the host. Nothing else of the covered directory is visible to the
//! function, and what is bound back keeps its own modes. The environment's `/tmp` is owned by
//! the function's user, mode 0700.
//!
//! Where namespaces are not available, the environment gets a private directory exported as
//! `TMPDIR`, removed when the environment ends, and the task root relies on its file modes
//! (Sluice's own copies of packages have no write bits).

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::user::UserIds;

/// How Sluice makes an environment's mount namespace: as root directly; otherwise inside a
/// user namespace of its own where the environment keeps Sluice's user and group ids.
#[derive(Debug, Clone)]
pub(crate) struct NamespaceMode {
    user: Option<UserMaps>,
}

/// The one-line id maps an unprivileged process may write for itself.
#[derive(Debug, Clone)]
struct UserMaps {
    uid_map: CString,
    gid_map: CString,
}

/// Whether (and how) this process can give environments their own mount namespace, probed
/// once.
pub(crate) fn namespace_mode() -> Option<&'static NamespaceMode> {
    static MODE: OnceLock<Option<NamespaceMode>> = OnceLock::new();
    MODE.get_or_init(|| {
        // SAFETY: these getters have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mode = NamespaceMode {
            user: (euid != 0).then(|| UserMaps {
                uid_map: CString::new(format!("{euid} {euid} 1")).unwrap_or_default(),
                gid_map: CString::new(format!("{egid} {egid} 1")).unwrap_or_default(),
            }),
        };
        if probe_namespace(&mode) {
            Some(mode)
        } else {
            tracing::warn!(
                "cannot make mount namespaces (as root, or in a user namespace): task roots are \
                 read-only only by their file modes and functions get a private TMPDIR instead \
                 of their own /tmp"
            );
            None
        }
    })
    .as_ref()
}

/// Forks a child that makes a mount namespace and a private tmpfs, and reports whether both
/// worked. The child only makes system calls before `_exit`, as after any fork of a threaded
/// process.
fn probe_namespace(mode: &NamespaceMode) -> bool {
    // SAFETY: the child runs only async-signal-safe system calls and exits with _exit; the
    // parent waits for exactly that child.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return false;
        }
        if pid == 0 {
            let ok = mode.enter().is_ok()
                && libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"size=1m".as_ptr().cast(),
                ) == 0;
            libc::_exit(if ok { 0 } else { 1 });
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                return false;
            }
        }
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `data` to `path` with bare system calls (it runs between fork and exec).
fn write_proc_file(path: &std::ffi::CStr, data: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: both pointers are NUL-terminated strings that outlive the calls.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = data.to_bytes().len();
        let written = libc::write(fd, data.as_ptr().cast(), len);
        libc::close(fd);
        if written != len as isize {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl NamespaceMode {
    /// Moves the calling process (a child between fork and exec) into a new mount namespace
    /// whose mounts do not propagate back to the host; without root, into a new user
    /// namespace first, where it keeps its ids and, until exec, the capabilities to mount.
    /// After exec a process that is not root there has none left, so it cannot undo the
    /// mounts.
    fn enter(&self) -> io::Result<()> {
        // SAFETY: system calls on NUL-terminated strings made before the fork.
        unsafe {
            match &self.user {
                None => check(libc::unshare(libc::CLONE_NEWNS))?,
                Some(maps) => {
                    check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
                    // An unprivileged process may map only its own ids, and its gid only once
                    // setgroups is denied.
                    write_proc_file(c"/proc/self/setgroups", c"deny")?;
                    write_proc_file(c"/proc/self/uid_map", &maps.uid_map)?;
                    write_proc_file(c"/proc/self/gid_map", &maps.gid_map)?;
                }
            }
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))
        }
    }
}

/// Removes the private `TMPDIR`s that environments of a Sluice no longer running left under
/// `scratch` (named `<pid>-<environment>`; a crash leaves them behind).
pub(crate) fn remove_stale(scratch: &Path) {
    super::remove_orphans(scratch, "", |path| {
        let _ = std::fs::remove_dir_all(path);
    });
}

/// How one environment is confined, prepared before its process is forked.
#[derive(Debug)]
pub(crate) enum Sandbox {
    Namespace { hook: NamespaceHook },
    Private { tmpdir: PathBuf },
}

impl Sandbox {
    /// Prepares the sandbox of one environment. `scratch` is where a private `TMPDIR` goes
    /// when namespaces are not available.
    pub(crate) fn prepare(
        task_root: &Path,
        program: &Path,
        ephemeral_storage: u64,
        scratch: &Path,
        id: &str,
        user: Option<UserIds>,
    ) -> io::Result<Self> {
        if let Some(mode) = namespace_mode() {
            let cstr = |p: &Path| {
                CString::new(p.as_os_str().as_encoded_bytes())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
            };
            // Directories leading to a task root under /tmp must exist again in the new tmpfs
            // before the task root can be bound there.
            let mut mkdirs = Vec::new();
            if let Ok(rel) = task_root.strip_prefix("/tmp") {
                let mut at = PathBuf::from("/tmp");
                for component in rel.components() {
                    at.push(component);
                    mkdirs.push(cstr(&at)?);
                }
            }
            let hook = NamespaceHook {
                mode: mode.clone(),
                remount_flags: libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | locked_flags(task_root)?,
                task_root: cstr(task_root)?,
                tmpfs_options: CString::new(match user {
                    Some(u) => format!(
                        "size={ephemeral_storage},mode=0700,uid={},gid={}",
                        u.uid, u.gid
                    ),
                    None => format!("size={ephemeral_storage},mode=1777"),
                })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                mkdirs,
                covers: match user {
                    Some(user) => covers_for(user, &[task_root, program])?,
                    None => Vec::new(),
                },
            };
            Ok(Self::Namespace { hook })
        } else {
            let tmpdir = scratch.join(id);
            std::fs::create_dir_all(scratch)?;
            std::fs::create_dir(&tmpdir)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmpdir, std::fs::Permissions::from_mode(0o700))?;
            if let Some(user) = user {
                std::os::unix::fs::chown(&tmpdir, Some(user.uid), Some(user.gid))?;
            }
            Ok(Self::Private { tmpdir })
        }
    }

    /// The environment variables the sandbox adds (the private `TMPDIR`).
    pub(crate) fn environment(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Namespace { .. } => Vec::new(),
            Self::Private { tmpdir } => vec![("TMPDIR", tmpdir.display().to_string())],
        }
    }

    /// What the child must do between fork and exec.
    pub(crate) fn child_hook(&self) -> Option<NamespaceHook> {
        match self {
            Self::Namespace { hook, .. } => Some(hook.clone()),
            Self::Private { .. } => None,
        }
    }

    /// Removes what the environment left in its private `TMPDIR` (a tmpfs in its own
    /// namespace goes away with the namespace).
    pub(crate) fn clean_up(&self) {
        if let Self::Private { tmpdir } = self {
            let _ = std::fs::remove_dir_all(tmpdir);
        }
    }
}

/// Everything the child needs to confine itself, made before the fork so the child only
/// makes system calls.
#[derive(Debug, Clone)]
pub(crate) struct NamespaceHook {
    mode: NamespaceMode,
    /// Remounting the task root read-only must keep the flags its file system was mounted
    /// with (a user namespace may not drop them).
    remount_flags: libc::c_ulong,
    task_root: CString,
    tmpfs_options: CString,
    mkdirs: Vec<CString>,
    /// Directories the function's user cannot search, outermost first, to be covered.
    covers: Vec<Cover>,
}

/// A directory covered by an empty tmpfs with one way through it bound back.
#[derive(Debug, Clone)]
struct Cover {
    blocked: CString,
    next: CString,
    next_is_dir: bool,
}

/// The covers the user needs to reach every one of `targets`, as written and as resolved.
fn covers_for(user: UserIds, targets: &[&Path]) -> io::Result<Vec<Cover>> {
    use std::os::unix::fs::MetadataExt;
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let mut covers: Vec<(PathBuf, PathBuf)> = Vec::new();
    for target in targets {
        let mut paths = vec![target.to_path_buf()];
        if let Ok(real) = std::fs::canonicalize(target) {
            paths.push(real);
        }
        for path in paths {
            let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
            ancestors.reverse();
            for dir in ancestors {
                // The environment's own tmpfs replaces `/tmp`, with the way to a task root in
                // it made again.
                if dir.starts_with("/tmp") {
                    continue;
                }
                let Ok(meta) = std::fs::metadata(dir) else {
                    continue;
                };
                let bit = if meta.uid() == user.uid {
                    0o100
                } else if meta.gid() == user.gid {
                    0o010
                } else {
                    0o001
                };
                if meta.mode() & bit != 0 {
                    continue;
                }
                let Some(next) = path
                    .strip_prefix(dir)
                    .ok()
                    .and_then(|rest| rest.components().next())
                    .map(|first| dir.join(first))
                else {
                    continue;
                };
                if !covers.iter().any(|(b, n)| b == dir && *n == next) {
                    covers.push((dir.to_path_buf(), next));
                }
            }
        }
    }
    // Outer directories first: an inner cover goes on top of what the outer one bound back.
    covers.sort_by_key(|(blocked, _)| blocked.components().count());
    covers
        .into_iter()
        .map(|(blocked, next)| {
            Ok(Cover {
                next_is_dir: next.is_dir(),
                blocked: cstr(&blocked)?,
                next: cstr(&next)?,
            })
        })
        .collect()
}

/// At most this many covers are made (each holds a descriptor until it is bound).
const MAX_COVERS: usize = 32;

const CAP_SYS_ADMIN: libc::c_ulong = 21;

impl NamespaceHook {
    /// Runs in the child between fork and exec: only async-signal-safe system calls.
    pub(crate) fn enter(&self) -> io::Result<()> {
        self.mode.enter()?;
        self.make_covers()?;
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string made before the fork, or null
        // where mount(2) allows it.
        unsafe {
            // Held across the tmpfs mount: the task root stays reachable through it once the
            // tmpfs covers `/tmp` (where packages often live). Opened inside the new namespace,
            // since a bind mount's source must belong to it.
            let fd = libc::open(
                self.task_root.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut fd_path = [0u8; 32];
            fd_path_of(fd, &mut fd_path);
            check(libc::mount(
                c"tmpfs".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                self.tmpfs_options.as_ptr().cast(),
            ))?;
            for dir in &self.mkdirs {
                if libc::mkdir(dir.as_ptr(), 0o755) != 0
                    && *libc::__errno_location() != libc::EEXIST
                {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::mount(
                fd_path.as_ptr().cast(),
                self.task_root.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            libc::close(fd);
            check(libc::mount(
                null,
                self.task_root.as_ptr(),
                null,
                self.remount_flags,
                std::ptr::null(),
            ))?;
            // Without CAP_SYS_ADMIN the function cannot remount the task root writable or
            // unmount it; after exec a root process only has the capabilities left here.
            check(libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0))?;
        }
        Ok(())
    }
}

impl NamespaceHook {
    /// Covers the directories the function's user cannot search (see the module's notes).
    /// Every way through is opened before anything is covered, inside the new namespace.
    fn make_covers(&self) -> io::Result<()> {
        if self.covers.is_empty() {
            return Ok(());
        }
        let mut fds = [-1 as libc::c_int; MAX_COVERS];
        let covers = &self.covers[..self.covers.len().min(MAX_COVERS)];
        // SAFETY: NUL-terminated strings made before the fork; descriptors this child owns.
        unsafe {
            for (cover, fd) in covers.iter().zip(fds.iter_mut()) {
                *fd = libc::open(cover.next.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                if *fd < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let mut covered: [Option<&CString>; MAX_COVERS] = [None; MAX_COVERS];
            for (i, (cover, fd)) in covers.iter().zip(fds.iter()).enumerate() {
                // One tmpfs per blocked directory, however many ways go through it.
                if !covered[..i].contains(&Some(&cover.blocked)) {
                    check(libc::mount(
                        c"tmpfs".as_ptr(),
                        cover.blocked.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        c"mode=0755,size=64k".as_ptr().cast(),
                    ))?;
                }
                covered[i] = Some(&cover.blocked);
                if cover.next_is_dir {
                    if libc::mkdir(cover.next.as_ptr(), 0o755) != 0
                        && *libc::__errno_location() != libc::EEXIST
                    {
                        return Err(io::Error::last_os_error());
                    }
                } else {
                    let f = libc::open(
                        cover.next.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if f < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(f);
                }
                let mut fd_path = [0u8; 32];
                fd_path_of(*fd, &mut fd_path);
                check(libc::mount(
                    fd_path.as_ptr().cast(),
                    cover.next.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                libc::close(*fd);
            }
        }
        Ok(())
    }
}

/// The mount flags of the file system holding `path` that a read-only remount must repeat.
fn locked_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs fills the zeroed struct it is given; the path is NUL-terminated.
    let flags = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st.f_flag
    };
    let mut out = 0;
    for (st, ms) in [
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if flags & st != 0 {
            out |= ms;
        }
    }
    Ok(out)
}

/// Writes `/proc/self/fd/<fd>` and a NUL into `buf` without allocating (it runs between fork
/// and exec).
fn fd_path_of(fd: libc::c_int, buf: &mut [u8; 32]) {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_fd_path_without_allocating() {
        let mut buf = [0u8; 32];
        fd_path_of(1234, &mut buf);
        assert_eq!(&buf[..19], b"/proc/self/fd/1234\0");
        fd_path_of(0, &mut buf);
        assert_eq!(&buf[..16], b"/proc/self/fd/0\0");
    }
}
