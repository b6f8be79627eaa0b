//! The tailnet listener and connection stream on the Rust side.
//!
//! Each accepted connection arrives from the bridge as one `SOCK_SEQPACKET`
//! message carrying both the connection's fd (SCM_RIGHTS, received with
//! `MSG_CMSG_CLOEXEC`) and the peer's `ip:port`, so the address reported for a
//! connection is always the one the bridge accepted it from.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
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

/// Receives one connection message: `Ok(None)` at end of stream.
fn recv_connection(fd: RawFd) -> io::Result<Option<(Stream, SocketAddr)>> {
    let mut buf = [0u8; 128];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (bytes, flags, raw_fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )?;
        let mut raw_fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                raw_fds.extend(fds);
            }
        }
        (msg.bytes, msg.flags, raw_fds)
    };
    let mut fds: Vec<OwnedFd> = raw_fds
        .into_iter()
        // SAFETY: SCM_RIGHTS just installed these fds in this process for us;
        // nothing else refers to them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();

    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if flags.contains(MsgFlags::MSG_TRUNC) || flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(invalid(
            "truncated connection message from the bridge".into(),
        ));
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
        AddressFamily, ControlMessage, SockFlag, SockType, sendmsg, socketpair,
    };
    use std::io::IoSlice;
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
}
