//! Job messages on a `SOCK_SEQPACKET` control socket: one [`JobRequest`]
//! (JSON) with the job's three descriptors (`SCM_RIGHTS`: its status
//! socket end, the write ends of its stdout and stderr pipes). The
//! supervisor receives them from the daemon, and sends them on to the
//! launchers it keeps ready ([`crate::launcher::ready`]), which receive
//! them the same way.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tailkitd_launch::JobRequest;

/// What a receive found.
pub enum Received {
    /// A message: the request (`None` if it was malformed or truncated)
    /// and every descriptor that came with it (close-on-exec).
    Job(Option<JobRequest>, Vec<OwnedFd>),
    /// Nothing yet.
    Nothing,
    /// The other end is gone.
    Closed,
}

/// Receives one job message from `control` without blocking, into `buf`
/// (at least [`tailkitd_launch::MAX_JOB_MESSAGE`] bytes).
pub fn receive(control: impl AsFd, buf: &mut [u8]) -> Received {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let received = match rustix::net::recvmsg(
        control,
        &mut iov,
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    ) {
        Ok(r) => r,
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return Received::Nothing,
        Err(_) => return Received::Closed,
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.bytes == 0 && fds.is_empty() {
        return Received::Closed;
    }
    let truncated = received
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
    let request = if truncated {
        None
    } else {
        serde_json::from_slice(&buf[..received.bytes]).ok()
    };
    Received::Job(request, fds)
}

/// Sends one job message (`message`, a [`JobRequest`] as JSON, and `fds`)
/// on `control`, without blocking.
pub fn send(control: impl AsFd, message: &[u8], fds: [BorrowedFd<'_>; 3]) -> std::io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    ancillary.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        control,
        &[IoSlice::new(message)],
        &mut ancillary,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?;
    Ok(())
}
