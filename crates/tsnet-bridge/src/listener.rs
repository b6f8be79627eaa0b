//! The tailnet listener and connection stream on the Rust side.
//!
//! Each accepted connection arrives from the bridge as one `SOCK_SEQPACKET`
//! message carrying both the connection's fd (SCM_RIGHTS, received with
//! `MSG_CMSG_CLOEXEC`) and the peer's `ip:port`, so the address reported for a
//! connection is always the one the bridge accepted it from.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use super::ffi;

/// A tailnet TCP listener. Dropping it closes the listener on the tailnet.
#[derive(Debug)]
pub struct Listener {
    handle: i64,
    port: u16,
    sock: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Wraps the bridge's listener socket. Must run inside a tokio runtime.
    pub(crate) fn new(handle: i64, sock: OwnedFd, port: u16) -> io::Result<Listener> {
        set_nonblocking(&sock)?;
        // SAFETY: the OwnedFd owns its fd, which stays open and unchanged
        // until the AsyncFd (which owns the OwnedFd) is dropped.
        let sock = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Listener { handle, port, sock })
    }

    /// Waits for the next connection and returns it with the peer's tailnet
    /// address (the address the connection really came from).
    ///
    /// # Errors
    ///
    /// `ErrorKind::NotConnected` once the listener is gone (its node was
    /// closed); `ErrorKind::InvalidData` for a malformed message from the
    /// bridge (the connection in it, if any, is closed: a connection whose
    /// peer cannot be named is refused); other I/O errors as they come.
    pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        loop {
            let mut guard = self.sock.readable().await?;
            match guard.try_io(|sock| recv_connection(sock.get_ref().as_raw_fd())) {
                Ok(Ok(Some(conn))) => return Ok(conn),
                Ok(Ok(None)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the tailnet listener is closed",
                    ));
                }
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }

    /// The tailnet port this listener accepts on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Quick in Go (closes two sockets). Closing our socket would also
        // stop the listener; this makes it immediate.
        let _ = ffi::listener_close(self.handle);
    }
}

/// How many fds one connection message may carry before the kernel cuts
/// the control data (the bridge sends one).
const MAX_FDS_PER_MESSAGE: usize = 4;

/// Receives one connection message: `Ok(None)` at end of stream.
///
/// Every fd that arrived is owned (and so closed on every error path)
/// before any check: a message whose control data was truncated
/// (`MSG_CTRUNC`, more fds than [`MAX_FDS_PER_MESSAGE`]) still installed
/// the fds that fit, and the kernel released the rest.
fn recv_connection(fd: RawFd) -> io::Result<Option<(Stream, SocketAddr)>> {
    let mut buf = [0u8; 128];
    let (bytes, flags, mut fds) = recv_with_fds(fd, &mut buf)?;

    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(invalid(format!(
            "truncated connection message from the bridge ({} fds received and closed)",
            fds.len()
        )));
    }
    if fds.len() != 1 {
        return Err(invalid(format!(
            "connection message from the bridge carries {} fds, want 1",
            fds.len()
        )));
    }
    let text = std::str::from_utf8(&buf[..bytes])
        .map_err(|_| invalid("peer address from the bridge is not UTF-8".into()))?;
    let peer: SocketAddr = text
        .parse()
        .map_err(|_| invalid(format!("bad peer address {text:?} from the bridge")))?;
    let stream = Stream::from_fd(fds.remove(0))?;
    Ok(Some((stream, peer)))
}

/// One `recvmsg` (non-blocking, `MSG_CMSG_CLOEXEC`): the payload length,
/// the message flags, and every fd of every `SCM_RIGHTS` control message,
/// owned. By hand rather than through nix, whose control-message iterator
/// refuses a truncated message and so would leave the fds that did arrive
/// open and unowned.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, libc::c_int, Vec<OwnedFd>)> {
    const FD_SIZE: usize = std::mem::size_of::<libc::c_int>();
    // u64s: the control buffer must be aligned for `cmsghdr`.
    let mut cmsg = [0u64; 16];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * FD_SIZE) as libc::c_uint) };
    let space = (space as usize).min(std::mem::size_of_val(&cmsg));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at `iov` (over `buf`) and `cmsg`, both live and
    // writable for the whole call, with their true lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled in by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay
    // within `msg_control`/`msg_controllen` (which the kernel lowered to what
    // it wrote) and return null past the end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a complete header inside
        // the control buffer (CMSG_FIRSTHDR/CMSG_NXTHDR check that).
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(header) / FD_SIZE;
            // SAFETY: the data of this header holds `count` ints within the
            // control buffer (cmsg_len covers them).
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: i < count, inside this header's data; it may be
                // unaligned, hence read_unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                if raw >= 0 {
                    // SAFETY: SCM_RIGHTS just installed this fd in this
                    // process for us; nothing else refers to it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: `msg` and `c` are as above.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n as usize, msg.msg_flags, fds))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A tailnet TCP connection: an AF_UNIX socket the bridge relays to and from
/// the tailnet. Shutting down the write side half-closes the connection (the
/// peer reads end of stream and can still answer); dropping it closes it.
#[derive(Debug)]
pub struct Stream {
    inner: tokio::net::UnixStream,
}

impl Stream {
    /// Wraps a relay socket from the bridge. Must run inside a tokio runtime.
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Stream> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        Ok(Stream {
            inner: tokio::net::UnixStream::from_std(std)?,
        })
    }

    /// The underlying local socket (for socket options or splitting).
    pub fn into_inner(self) -> tokio::net::UnixStream {
        self.inner
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
    };
    use std::io::IoSlice;
    use std::io::Read;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn seqpacket() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn send(sock: &OwnedFd, payload: &[u8], fds: &[RawFd]) {
        let iov = [IoSlice::new(payload)];
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
        sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    }

    // A bridge-shaped message yields a working stream with the peer address,
    // and the received fd is close-on-exec.
    #[tokio::test]
    async fn receives_stream_and_address_in_one_message() {
        let (ours, theirs) = seqpacket();
        let (local, remote) = std::os::unix::net::UnixStream::pair().unwrap();
        send(&theirs, b"100.64.0.7:41000", &[local.as_raw_fd()]);
        drop(local);
        let ln = Listener::new(-1, ours, 80).unwrap();
        let (mut stream, peer) = ln.accept().await.unwrap();
        assert_eq!(peer, "100.64.0.7:41000".parse::<SocketAddr>().unwrap());

        let inner = stream.inner.as_raw_fd();
        let fdflags = nix::fcntl::fcntl(
            // SAFETY: `inner` is open for the lifetime of `stream`.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(inner) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .unwrap();
        assert_ne!(
            fdflags & libc::FD_CLOEXEC,
            0,
            "received fd is close-on-exec"
        );

        let mut remote = tokio::net::UnixStream::from_std({
            remote.set_nonblocking(true).unwrap();
            remote
        })
        .unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        remote.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        drop(theirs);
        let err = ln.accept().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    }

    #[tokio::test]
    async fn malformed_messages_are_refused() {
        let (ours, theirs) = seqpacket();
        let ln = Listener::new(-1, ours, 80).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        send(&theirs, b"not an address", &[a.as_raw_fd()]);
        assert_eq!(
            ln.accept().await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        send(&theirs, b"100.64.0.7:1", &[]);
        assert_eq!(
            ln.accept().await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // The listener keeps working after a bad message.
        send(&theirs, b"[fd7a:115c:a1e0::7]:2", &[a.as_raw_fd()]);
        let (_s, peer) = ln.accept().await.unwrap();
        assert_eq!(peer.port(), 2);
        assert!(peer.is_ipv6());
    }

    // More fds than the control buffer holds: the kernel installs those
    // that fit and sets MSG_CTRUNC. Every one of them must be closed (the
    // peer of the socket they copy then reads end of stream), and the
    // listener must go on.
    #[tokio::test]
    async fn a_truncated_message_closes_every_fd_it_brought() {
        let (ours, theirs) = seqpacket();
        let ln = Listener::new(-1, ours, 80).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let copies = [a.as_raw_fd(); 2 * MAX_FDS_PER_MESSAGE];
        send(&theirs, b"100.64.0.7:1", &copies);
        drop(a);
        let err = ln.accept().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("truncated"), "{err}");

        b.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut byte = [0u8; 1];
        let n = b.read(&mut byte).expect("a received fd was left open");
        assert_eq!(n, 0, "end of stream: every copy of the fd is closed");

        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        send(&theirs, b"100.64.0.8:2", &[c.as_raw_fd()]);
        let (_s, peer) = ln.accept().await.unwrap();
        assert_eq!(peer.port(), 2);
    }
}
