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
