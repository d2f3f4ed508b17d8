//! Sockets handed over by systemd (socket activation, `LISTEN_FDS`).
//!
//! `bangerd.socket` passes the `.vm` DNS sockets named `dns`
//! (`FileDescriptorName=dns`). They are taken in `main` before the async
//! runtime starts: reading them unsets the `LISTEN_*` variables, which is
//! only sound while the process has one thread.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use nix::sys::socket::{SockType, getsockopt, sockopt};

use crate::error::Error;

/// Take the passed descriptors named `name`. Others are closed. Nothing
/// passed (not socket-activated) gives an empty list.
pub fn take_named(name: &str) -> Result<Vec<OwnedFd>, Error> {
    let passed = libsystemd::activation::receive_descriptors_with_names(true)
        .map_err(|e| Error::failed(format!("cannot read the sockets systemd passed: {e}")))?;
    let mut out = Vec::new();
    for (fd, fd_name) in passed {
        let raw = fd.into_raw_fd();
        // SAFETY: systemd passed this descriptor to this process and
        // libsystemd gave up ownership of it with into_raw_fd; nothing
        // else holds it.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        if fd_name == name {
            out.push(owned);
        }
    }
    Ok(out)
}

/// Passed DNS sockets, sorted into UDP sockets and TCP listeners (made
/// non-blocking and registered with the current runtime).
pub fn dns_sockets(
    fds: Vec<OwnedFd>,
) -> Result<(Vec<tokio::net::UdpSocket>, Vec<tokio::net::TcpListener>), Error> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for fd in fds {
        let kind = getsockopt(&fd, sockopt::SockType)
            .map_err(|e| Error::failed(format!("a passed DNS descriptor is not a socket: {e}")))?;
        match kind {
            SockType::Datagram => {
                let s = std::net::UdpSocket::from(fd);
                s.set_nonblocking(true)
                    .and_then(|()| tokio::net::UdpSocket::from_std(s))
                    .map(|s| udp.push(s))
                    .map_err(|e| Error::failed(format!("cannot use a passed UDP socket: {e}")))?;
            }
            SockType::Stream => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(l))
                    .map(|l| tcp.push(l))
                    .map_err(|e| Error::failed(format!("cannot use a passed TCP socket: {e}")))?;
            }
            other => {
                return Err(Error::failed(format!(
                    "a passed DNS socket has type {other:?}; bangerd.socket must use ListenDatagram and ListenStream"
                )));
            }
        }
    }
    Ok((udp, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passed_sockets_are_sorted_by_type() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let t = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let (udp, tcp) = dns_sockets(vec![OwnedFd::from(t), OwnedFd::from(u)]).expect("sorted");
        assert_eq!((udp.len(), tcp.len()), (1, 1));
        // Anything that is not a socket is refused.
        let file = tempfile::tempfile().expect("file");
        assert!(dns_sockets(vec![OwnedFd::from(file)]).is_err());
    }

    #[test]
    fn nothing_passed_is_an_empty_list() {
        // The test process was not socket-activated.
        assert!(take_named("dns").expect("read").is_empty());
    }
}
