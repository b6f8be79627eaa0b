//! Stopping a call early: Ctrl-C (SIGINT), SIGTERM, SIGHUP, or a local
//! stdout that closed. The first stop is shared by every node's task
//! (each cancels its remote job, or stops following it) and fixes the
//! exit status (128 + the signal); a second signal exits at once, without
//! waiting for the cancellations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The stop shared by a call's tasks; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    exit: Arc<AtomicU8>,
}

impl Stop {
    /// A stop not triggered yet.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Stops the call with exit status `exit` (the first trigger wins).
    pub fn trigger(&self, exit: u8) {
        let _ = self
            .exit
            .compare_exchange(0, exit.max(1), Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    /// The exit status of the stop, once triggered.
    pub fn exit(&self) -> Option<u8> {
        self.token
            .is_cancelled()
            .then(|| self.exit.load(Ordering::Acquire))
    }

    /// Waits for the stop; its exit status.
    pub async fn stopped(&self) -> u8 {
        self.token.cancelled().await;
        self.exit.load(Ordering::Acquire)
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP into `stop` (a note on stderr says
/// what happens); a second one exits the process at once.
///
/// # Errors
///
/// When the handlers cannot be installed.
pub fn watch_signals(stop: Stop) -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    // The Go runtime in this process needs SA_ONSTACK on every handler.
    tsnet_bridge::ensure_signal_onstack(&[
        Signal::SIGINT as i32,
        Signal::SIGTERM as i32,
        Signal::SIGHUP as i32,
    ])?;
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = int.recv() => Signal::SIGINT,
                _ = term.recv() => Signal::SIGTERM,
                _ = hup.recv() => Signal::SIGHUP,
            };
            let exit = u8::try_from(128 + sig as i32).unwrap_or(255);
            if stop.exit().is_some() {
                eprintln!("\ntailkitd: {sig} again: leaving without waiting for the remote jobs");
                std::process::exit(i32::from(exit));
            }
            stop.trigger(exit);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_trigger_sets_the_exit_status() {
        let stop = Stop::new();
        assert_eq!(stop.exit(), None);
        let waiter = tokio::spawn({
            let stop = stop.clone();
            async move { stop.stopped().await }
        });
        stop.trigger(130);
        stop.trigger(141);
        assert_eq!(waiter.await.unwrap(), 130);
        assert_eq!(stop.exit(), Some(130));
    }
}
