//! Socket options that neither std, tokio nor socket2 set for us.

use std::io;
use std::os::fd::AsRawFd;

fn set_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid descriptor, a c_int option value and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets the kernel fragment what the socket sends, as on a plain socket.
/// quinn-udp forbids fragmentation (it probes the path MTU itself): a
/// datagram larger than some hop's MTU would then be lost for good, its
/// ICMP error ignored.
pub fn allow_fragments(sock: &impl AsRawFd, v6: bool) -> io::Result<()> {
    if v6 {
        set_int(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        )?;
        set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)
    } else {
        set_int(
            sock,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )
    }
}

/// Marks every packet the socket sends with `mark` (`SO_MARK`, needs
/// CAP_NET_ADMIN; 0 removes the mark), for policy routing such as
/// wg-quick's `not fwmark` rule.
pub fn set_mark(sock: &impl AsRawFd, mark: u32) -> io::Result<()> {
    set_int(sock, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// Asks for `bytes` of receive and send buffer on `sock`: past the system's
/// cap (`net.core.rmem_max` / `wmem_max`, 208 KiB on most distributions)
/// when the process may (CAP_NET_ADMIN: `SO_RCVBUFFORCE`), else up to the
/// cap. Returns the buffers the kernel gave (each twice what was asked, its
/// bookkeeping included), receive first.
pub fn grow_buffers(sock: &socket2::Socket, bytes: usize) -> (usize, usize) {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if set_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want).is_err() {
        let _ = sock.set_recv_buffer_size(bytes);
    }
    if set_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want).is_err() {
        let _ = sock.set_send_buffer_size(bytes);
    }
    (
        sock.recv_buffer_size().unwrap_or(0),
        sock.send_buffer_size().unwrap_or(0),
    )
}

/// Bytes a TCP socket still holds to send: written by the process but not
/// yet acknowledged by the peer (`SIOCOUTQ`). `None` if the kernel does not
/// say (not a TCP socket, or closed).
pub fn send_queue(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int through the pointer,
    // which points at one; a descriptor that is not a socket fails.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, std::ptr::from_mut(&mut n)) };
    if rc == 0 {
        u32::try_from(n).ok()
    } else {
        None
    }
}

/// Whether the process at the other end of a local socket may use what the
/// socket serves: root, or this process's own user. The file's mode is not
/// enough (a umask can leave it open between `bind` and `chmod`, a
/// directory can belong to someone else); the kernel's credentials are.
/// Returns the peer's uid as well, for the log line of a refusal.
pub fn peer_is_owner(s: &tokio::net::UnixStream) -> (bool, Option<u32>) {
    let uid = s.peer_cred().ok().map(|p| p.uid());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    (matches!(uid, Some(u) if u == 0 || u == own), uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_queue_holds_what_the_peer_has_not_taken() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let mut a = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let (mut b, _) = l.accept().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(send_queue(a.as_raw_fd()), Some(0));
        // A peer that reads nothing: its buffer fills, then ours.
        a.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
        let chunk = [1u8; 65536];
        let mut sent = 0usize;
        loop {
            match a.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let held = send_queue(a.as_raw_fd()).unwrap_or(0);
        assert!(held > 0 && held as usize <= sent, "{held} of {sent}");
        // The peer takes some: the queue shrinks.
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while send_queue(a.as_raw_fd()).unwrap_or(u32::MAX) >= held {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never shrank"
            );
            got += b.read(&mut buf).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(got > 0);
        // Not a socket.
        let f = std::fs::File::open("/proc/self/status").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(send_queue(f.as_raw_fd()), None);
    }

    #[test]
    fn buffers_grow_to_what_is_allowed() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .unwrap_or_else(|e| panic!("socket: {e}"));
        let before = s.recv_buffer_size().unwrap_or(0);
        let (rx, tx) = grow_buffers(&s, 1 << 20);
        // At least what an unprivileged process gets (the cap), never less
        // than before; with CAP_NET_ADMIN, the whole of it (doubled).
        assert!(rx >= before && rx > 0 && tx > 0, "{before} {rx} {tx}");
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        if let Some(cap) = cap {
            assert!(rx >= (2 << 20).min(2 * cap), "{rx} {cap}");
        }
    }
}
