//! `network: none`: an execution environment in a network namespace of its own, with only
//! loopback up and its Runtime API listening there, as a Lambda function outside any VPC
//! that also has no internet would be.
//!
//! A short-lived thread moves itself into a new network namespace (`unshare` affects only the
//! calling thread), brings `lo` up, binds the Runtime API listener there and keeps a
//! descriptor of the namespace. The listener stays in that namespace for its life, and Sluice
//! accepts on it from anywhere; the environment's process joins the namespace with `setns`
//! between fork and exec. Making a network namespace needs root (CAP_SYS_ADMIN).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// A network namespace with loopback up, and the Runtime API listener bound in it.
pub(crate) struct Isolated {
    pub listener: TcpListener,
    pub namespace: OwnedFd,
}

/// Makes the namespace and binds `127.0.0.1:0` in it, on a thread of its own that ends here.
pub(crate) fn isolated_listener() -> io::Result<Isolated> {
    std::thread::Builder::new()
        .name("sluice-netns".to_owned())
        .spawn(|| {
            // SAFETY: unshare with a flag; only this thread changes namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            loopback_up()?;
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let namespace = File::open("/proc/thread-self/ns/net")?;
            Ok(Isolated {
                listener,
                namespace: namespace.into(),
            })
        })?
        .join()
        .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

/// `ifreq` as `SIOCGIFFLAGS`/`SIOCSIFFLAGS` read it: the name, then the flags in a union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a datagram socket used only for the two ioctls on a struct that lives on the
    // stack, and closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _union_rest: [0; 22],
        };
        req.name[..2].copy_from_slice(b"lo");
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            Err(io::Error::last_os_error())
        } else {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
    }
}

/// Joins the namespace `fd` between fork and exec (async-signal-safe).
pub(crate) fn enter(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns on a descriptor the parent keeps open across the fork.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Isolated {
    pub(crate) fn namespace_fd(&self) -> RawFd {
        self.namespace.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_in_its_own_namespace_is_out_of_reach_from_the_host() {
        if !crate::runtime::user::running_as_root() {
            eprintln!("SKIPPED: making a network namespace needs root");
            return;
        }
        let isolated = isolated_listener().expect("network namespace");
        let addr = isolated.listener.local_addr().expect("test setup");
        // The same address on the host's loopback is another socket, or none at all.
        let from_host =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500));
        isolated.listener.set_nonblocking(true).expect("test setup");
        if from_host.is_ok() {
            assert!(
                isolated.listener.accept().is_err(),
                "a host connection reached the namespace's listener"
            );
        }
        // Inside the namespace, loopback is up and the listener answers.
        let fd = isolated.namespace_fd();
        let reached = std::thread::spawn(move || {
            enter(fd).expect("test setup");
            std::net::TcpStream::connect(addr).is_ok()
        })
        .join()
        .expect("test setup");
        assert!(reached, "loopback inside the namespace is up");
    }
}
