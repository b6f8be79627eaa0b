//! Making signal handlers safe for the Go runtime that lives in this process.
//!
//! Go requires every signal handler installed by non-Go code to use
//! `SA_ONSTACK` (Go's `os/signal` documentation, "Go programs that use cgo"):
//! a signal may land on a Go thread, whose small goroutine stack a handler
//! without `SA_ONSTACK` runs on and can overflow, crashing the process
//! (tokio-rs/tokio#3520). signal-hook-registry 1.4.8, which `tokio::signal`
//! uses, installs its handlers with `SA_RESTART | SA_SIGINFO` only.

use std::{io, mem, ptr};

/// Re-reads the current action of each signal and, if a handler function is
/// installed without `SA_ONSTACK`, re-installs it unchanged but with
/// `SA_ONSTACK` added. Signals whose disposition is default or ignore are left
/// alone.
///
/// Call it after registering the process's signal handlers (for tailkitd:
/// after creating the `tokio::signal` streams for SIGHUP, SIGTERM, SIGINT and
/// SIGCHLD), and again after registering a handler for a new signal. It must
/// not race with another thread installing a handler for the same signal.
///
/// # Errors
///
/// When `sigaction` fails (for example, an invalid signal number).
pub fn ensure_signal_onstack(signals: &[i32]) -> io::Result<()> {
    for &sig in signals {
        // SAFETY: sigaction is plain data; all-zero is a valid value.
        let mut act: libc::sigaction = unsafe { mem::zeroed() };
        // SAFETY: a null new action only queries; `act` is valid for writes.
        if unsafe { libc::sigaction(sig, ptr::null(), &mut act) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if act.sa_sigaction == libc::SIG_DFL
            || act.sa_sigaction == libc::SIG_IGN
            || act.sa_flags & libc::SA_ONSTACK != 0
        {
            continue;
        }
        act.sa_flags |= libc::SA_ONSTACK;
        // SAFETY: re-installs the very handler, mask and flags just read,
        // plus SA_ONSTACK; the old action is not needed.
        if unsafe { libc::sigaction(sig, &act, ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether the handler currently installed for `sig` carries
/// `SA_ONSTACK` (`false` for the default or ignore disposition).
///
/// # Errors
///
/// When `sigaction` fails (an invalid signal number).
pub fn signal_handler_is_onstack(sig: i32) -> io::Result<bool> {
    // SAFETY: sigaction is plain data; all-zero is a valid value.
    let mut act: libc::sigaction = unsafe { mem::zeroed() };
    // SAFETY: a null new action only queries; `act` is valid for writes.
    if unsafe { libc::sigaction(sig, ptr::null(), &mut act) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let handled = act.sa_sigaction != libc::SIG_DFL && act.sa_sigaction != libc::SIG_IGN;
    Ok(handled && act.sa_flags & libc::SA_ONSTACK != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn current(sig: i32) -> libc::sigaction {
        // SAFETY: as in ensure_signal_onstack.
        let mut act: libc::sigaction = unsafe { mem::zeroed() };
        // SAFETY: query only; `act` is valid for writes.
        assert_eq!(unsafe { libc::sigaction(sig, ptr::null(), &mut act) }, 0);
        act
    }

    static HITS: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn count_hit(_sig: libc::c_int) {
        HITS.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn adds_sa_onstack_and_keeps_the_handler() {
        let sig = libc::SIGUSR1;
        // SAFETY: zeroed sigaction is valid; we fill handler and flags.
        let mut act: libc::sigaction = unsafe { mem::zeroed() };
        act.sa_sigaction = count_hit as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: installs a valid async-signal-safe handler (an atomic add).
        assert_eq!(unsafe { libc::sigaction(sig, &act, ptr::null_mut()) }, 0);
        assert_eq!(current(sig).sa_flags & libc::SA_ONSTACK, 0);

        ensure_signal_onstack(&[sig]).unwrap();
        let after = current(sig);
        assert_ne!(after.sa_flags & libc::SA_ONSTACK, 0);
        assert_ne!(after.sa_flags & libc::SA_RESTART, 0, "other flags are kept");
        assert_eq!(after.sa_sigaction, act.sa_sigaction, "same handler");

        let before = HITS.load(Ordering::SeqCst);
        // SAFETY: raising a signal whose handler we installed.
        assert_eq!(unsafe { libc::raise(sig) }, 0);
        assert_eq!(
            HITS.load(Ordering::SeqCst),
            before + 1,
            "the handler still runs"
        );

        // Idempotent.
        ensure_signal_onstack(&[sig]).unwrap();
        assert_eq!(current(sig).sa_flags, after.sa_flags);
    }

    #[test]
    fn default_dispositions_are_left_alone() {
        let sig = libc::SIGPWR;
        let before = current(sig);
        ensure_signal_onstack(&[sig]).unwrap();
        let after = current(sig);
        assert_eq!(after.sa_sigaction, before.sa_sigaction);
        if before.sa_sigaction == libc::SIG_DFL {
            assert_eq!(after.sa_flags, before.sa_flags);
        }
    }

    #[test]
    fn fixes_tokio_signal_handlers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sig = libc::SIGUSR2;
            let mut stream =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
                    .unwrap();
            ensure_signal_onstack(&[sig]).unwrap();
            assert_ne!(current(sig).sa_flags & libc::SA_ONSTACK, 0);
            // SAFETY: tokio's handler is installed for this signal.
            assert_eq!(unsafe { libc::raise(sig) }, 0);
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.recv())
                .await
                .expect("tokio still receives the signal")
                .unwrap();
        });
    }

    #[test]
    fn invalid_signals_are_errors() {
        assert!(ensure_signal_onstack(&[-1]).is_err());
    }
}
