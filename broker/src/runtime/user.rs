//! The user an execution environment runs as. Functions never run as Sluice's own uid when
//! Sluice is root: each function gets a user of its own, either the one its `run_as` names or,
//! by default, a dynamic one from [`DYNAMIC_IDS`] (the range systemd keeps for `DynamicUser=`),
//! so that one function cannot signal, trace or read `/proc` of another function or of Sluice.
//! A single shared `nobody` would let every function do all of that to every other.
//!
//! Dynamic ids are handed out in the order of the functions' names, skipping ids that
//! `/etc/passwd` (or NSS) already knows, so a function keeps its id across restarts as long
//! as no function is added before it. Files a function leaves outside its private `/tmp`
//! (in `/dev/shm`, `/var/tmp`) keep its id and could be read by whichever function gets that
//! id later, as with systemd's dynamic users.
//!
//! When Sluice is not root it cannot change users: functions run as Sluice's uid (and can do
//! to each other and to Sluice what that uid can), and `run_as` is refused at start.

use std::ffi::CString;
use std::io;
use std::ops::RangeInclusive;

/// Ids of dynamic function users (and of their groups, the same number).
pub(crate) const DYNAMIC_IDS: RangeInclusive<u32> = 61184..=65519;

/// A user and group id to run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

/// Whether Sluice runs as root (and so can, and must, run functions as other users).
pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Resolves `run_as: { user, group }` (names or numbers). The group defaults to the user's
/// primary group, or for a number unknown to the system to the group of the same number.
/// Root (uid or gid 0) is refused: it is Sluice's own user.
pub(crate) fn resolve(user: &str, group: Option<&str>) -> Result<UserIds, String> {
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, passwd_by_uid(uid).map_or(uid, |(_, gid)| gid)),
        Err(_) => passwd_by_name(user)
            .ok_or_else(|| format!("run_as.user: no user named `{user}` on this system"))?,
    };
    let gid = match group {
        None => primary,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_by_name(group)
                .ok_or_else(|| format!("run_as.group: no group named `{group}` on this system"))?,
        },
    };
    if uid == 0 || gid == 0 {
        return Err(
            "run_as: a function may not run as root (user or group 0), Sluice's own user"
                .to_owned(),
        );
    }
    Ok(UserIds { uid, gid })
}

/// Hands out dynamic users: the next id of [`DYNAMIC_IDS`] that no known user has.
pub(crate) struct DynamicIds {
    next: u32,
    /// Ids that functions' `run_as` name, never handed out again.
    taken: Vec<u32>,
}

impl DynamicIds {
    pub(crate) fn new(taken: Vec<u32>) -> Self {
        Self {
            next: *DYNAMIC_IDS.start(),
            taken,
        }
    }

    pub(crate) fn allocate(&mut self) -> Option<UserIds> {
        while DYNAMIC_IDS.contains(&self.next) {
            let id = self.next;
            self.next += 1;
            if !self.taken.contains(&id) && passwd_by_uid(id).is_none() {
                return Some(UserIds { uid: id, gid: id });
            }
        }
        None
    }
}

/// Drops to `ids` between fork and exec: no supplementary groups, then the group, then the
/// user (in that order: after setuid the others are no longer allowed).
pub(crate) fn drop_to(ids: UserIds) -> io::Result<()> {
    // SAFETY: async-signal-safe system calls without pointers but setgroups' null list.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(ids.gid) != 0
            || libc::setuid(ids.uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// No exec of the function gains privileges (set-user-id programs, file capabilities).
pub(crate) fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes `/proc/<sluice>/environ`, `mem` and ptrace to every process but root with
/// CAP_SYS_PTRACE, even one of Sluice's own uid: Sluice's environment holds its secrets.
pub fn make_undumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const BUF: usize = 16 * 1024;

fn passwd_by_name(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0u8; BUF];
    // SAFETY: getpwnam_r fills `pwd` with pointers into `buf`, both live for the call; only
    // the numeric ids are read afterwards.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

fn passwd_by_uid(uid: u32) -> Option<(u32, u32)> {
    let mut buf = vec![0u8; BUF];
    // SAFETY: as in `passwd_by_name`.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

fn group_by_name(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0u8; BUF];
    // SAFETY: as in `passwd_by_name`, for getgrnam_r.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers_and_refuses_root() {
        // `nobody` exists on every Linux system this runs on; its id differs between them.
        let nobody = resolve("nobody", None).expect("test setup");
        assert_ne!(nobody.uid, 0);
        assert_eq!(
            resolve("4242", Some("4343")).expect("test setup"),
            UserIds {
                uid: 4242,
                gid: 4343
            }
        );
        assert_eq!(resolve("4242", None).expect("test setup").gid, 4242);
        assert!(
            resolve("root", None)
                .expect_err("an error")
                .contains("may not run as root")
        );
        assert!(resolve("4242", Some("0")).is_err());
        assert!(
            resolve("no-such-user-here", None)
                .expect_err("an error")
                .contains("no user named `no-such-user-here`")
        );
        assert!(resolve("4242", Some("no-such-group-here")).is_err());
    }

    #[test]
    fn dynamic_ids_are_distinct_and_in_range() {
        let first = *DYNAMIC_IDS.start();
        let mut ids = DynamicIds::new(vec![first]);
        let a = ids.allocate().expect("test setup");
        assert_ne!(a.uid, first, "an id a run_as names is not handed out");
        let b = ids.allocate().expect("test setup");
        assert_ne!(a.uid, b.uid);
        assert!(DYNAMIC_IDS.contains(&a.uid) && DYNAMIC_IDS.contains(&b.uid));
        assert_eq!(a.uid, a.gid);
    }
}
