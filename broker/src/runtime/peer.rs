//! Who may talk to an execution environment's Runtime API: only the environment's own
//! processes.
//!
//! The Runtime API is a TCP port on loopback (that is what `AWS_LAMBDA_RUNTIME_API` must name
//! for real runtime clients), and any local process can find it in `/proc/net/tcp`. Lambda's
//! answer, a secret path prefix in `AWS_LAMBDA_RUNTIME_API`, is not kept by every client: the
//! Rust `lambda_runtime` crate (1.x) parses the variable as an `http::Uri` without a scheme,
//! which refuses a path, and panics at start. So instead of a secret the client has to carry,
//! Sluice asks the kernel who is on the other end: the connection's client socket is looked up
//! by its address pair in the environment's `/proc/<pid>/net/tcp` (its inode), and the socket
//! must be held open by a process of the environment (its cgroup, or its process group where
//! there is no cgroup). A process of another environment, of another function or of anyone
//! else on the host is refused before its request is read. The check runs once per
//! connection; a runtime keeps its connection alive across invocations.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// The inode of the TCP socket whose local address is `client` and remote address is
/// `server`, as the network namespace of `netns_pid` sees it (`/proc/<pid>/net/tcp{,6}`).
pub(crate) fn client_socket_inode(
    netns_pid: u32,
    client: SocketAddr,
    server: SocketAddr,
) -> io::Result<Option<u64>> {
    let table = match client.ip() {
        IpAddr::V4(_) => "tcp",
        IpAddr::V6(_) => "tcp6",
    };
    let text = std::fs::read_to_string(format!("/proc/{netns_pid}/net/{table}"))?;
    Ok(find_inode(&text, client, server))
}

/// Finds, in the text of `/proc/net/tcp{,6}`, the inode of the socket from `local` to
/// `remote`.
fn find_inode(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let want_local = proc_address(local);
    let want_remote = proc_address(remote);
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        if l.eq_ignore_ascii_case(&want_local) && r.eq_ignore_ascii_case(&want_remote) {
            inode.parse().ok().filter(|&i| i != 0)
        } else {
            None
        }
    })
}

/// An address as the kernel prints it in `/proc/net/tcp`: the address's bytes in memory order
/// as 32-bit words in host byte order, a colon, the port in hex.
fn proc_address(addr: SocketAddr) -> String {
    let words: Vec<[u8; 4]> = match addr.ip() {
        IpAddr::V4(ip) => vec![ip.octets()],
        IpAddr::V6(ip) => ip
            .octets()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
    };
    let mut out = String::new();
    for word in words {
        out.push_str(&format!("{:08X}", u32::from_ne_bytes(word)));
    }
    out.push_str(&format!(":{:04X}", addr.port()));
    out
}

/// Whether one of `pids` holds the socket `inode` open.
pub(crate) fn held_by(pids: &[u32], inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    pids.iter().any(|pid| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == &*wanted)
        })
    })
}

/// The processes of the process group `pgid` (for environments without a cgroup).
pub(crate) fn process_group(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_addresses_as_the_kernel_does() {
        // 127.0.0.1:8080 on a little-endian host.
        if cfg!(target_endian = "little") {
            assert_eq!(
                proc_address("127.0.0.1:8080".parse().expect("test setup")),
                "0100007F:1F90"
            );
            assert_eq!(
                proc_address("[::1]:80".parse().expect("test setup")),
                "00000000000000000000000001000000:0050"
            );
        }
    }

    #[test]
    fn finds_this_process_holding_its_own_client_socket_and_no_one_else() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("test setup");
        let server = listener.local_addr().expect("test setup");
        let client = std::net::TcpStream::connect(server).expect("test setup");
        let (_accepted, peer) = listener.accept().expect("test setup");
        assert_eq!(peer, client.local_addr().expect("test setup"));
        let inode = client_socket_inode(std::process::id(), peer, server)
            .expect("test setup")
            .expect("the client socket is in /proc/net/tcp");
        assert!(held_by(&[std::process::id()], inode));
        // PID 1 is not this test.
        assert!(!held_by(&[1], inode));
        // The accepted side is a different socket, not mistaken for the client's.
        assert_ne!(
            client_socket_inode(std::process::id(), server, peer).expect("test setup"),
            Some(inode)
        );
    }

    #[test]
    fn an_unknown_address_pair_has_no_inode() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 20 4 30 10 -1\n";
        let local = "127.0.0.1:8080".parse().expect("test setup");
        let remote = "127.0.0.1:50000".parse().expect("test setup");
        if cfg!(target_endian = "little") {
            assert_eq!(find_inode(text, local, remote), Some(4242));
        }
        assert_eq!(find_inode(text, remote, local), None);
    }
}
