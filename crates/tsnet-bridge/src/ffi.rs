//! The Go bridge's C ABI (`go/tsnetbridge.h`) and thin safe
//! wrappers over it: each call gets its own error buffer, JSON results are
//! retried with a bigger buffer on `TSNB_ERANGE`, and handed-over file
//! descriptors become [`OwnedFd`]s at once. Every function here may block
//! (the Go side waits on the network): async callers use `spawn_blocking`.

use std::ffi::{CStr, CString, c_char, c_int};
use std::os::fd::{FromRawFd, OwnedFd};

use super::error::BridgeError;

// Return codes, as in tsnetbridge.h.
pub(crate) const TSNB_OK: c_int = 0;
pub(crate) const TSNB_ENOENT: c_int = -2;
pub(crate) const TSNB_EBADF: c_int = -9;
pub(crate) const TSNB_EINVAL: c_int = -22;
pub(crate) const TSNB_ERANGE: c_int = -34;
pub(crate) const TSNB_ETIMEDOUT: c_int = -110;
pub(crate) const TSNB_ENEEDSLOGIN: c_int = -1000;

// The header declares string parameters `char *` only because cgo cannot
// export `const char *`; the bridge never writes through them.
unsafe extern "C" {
    fn tsnetbridge_take_log_fd(out_fd: *mut c_int) -> c_int;
    fn tsnetbridge_orig_nofile(out_cur: *mut u64, out_max: *mut u64) -> c_int;
    fn tsnetbridge_node_new(
        config_json: *const c_char,
        out_node: *mut i64,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_node_up(node: i64, timeout_ms: i64, errbuf: *mut c_char, errlen: usize)
    -> c_int;
    fn tsnetbridge_node_status(
        node: i64,
        out: *mut c_char,
        outlen: usize,
        needed: *mut usize,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_node_ips(
        node: i64,
        out: *mut c_char,
        outlen: usize,
        needed: *mut usize,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_node_peers(
        node: i64,
        out: *mut c_char,
        outlen: usize,
        needed: *mut usize,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_node_listen(
        node: i64,
        port: u16,
        out_listener: *mut i64,
        out_fd: *mut c_int,
        out_port: *mut u16,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_listener_close(listener: i64, errbuf: *mut c_char, errlen: usize) -> c_int;
    fn tsnetbridge_node_dial(
        node: i64,
        addr: *const c_char,
        timeout_ms: i64,
        out_fd: *mut c_int,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_node_whois(
        node: i64,
        addr: *const c_char,
        timeout_ms: i64,
        out: *mut c_char,
        outlen: usize,
        needed: *mut usize,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_node_loopback(
        node: i64,
        out: *mut c_char,
        outlen: usize,
        needed: *mut usize,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_node_close(node: i64, errbuf: *mut c_char, errlen: usize) -> c_int;
    fn tsnetbridge_exec(
        path: *const c_char,
        argv: *const *const c_char,
        argc: c_int,
        envp: *const *const c_char,
        envc: c_int,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

#[cfg(feature = "localnet")]
unsafe extern "C" {
    fn tsnetbridge_localnet_start(
        opts_json: *const c_char,
        out_localnet: *mut i64,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_localnet_info(
        localnet: i64,
        out: *mut c_char,
        outlen: usize,
        needed: *mut usize,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_localnet_grant(
        localnet: i64,
        grant_json: *const c_char,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_localnet_approve(
        localnet: i64,
        auth_url: *const c_char,
        errbuf: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn tsnetbridge_localnet_close(localnet: i64, errbuf: *mut c_char, errlen: usize) -> c_int;
}

/// A failed bridge call: its code and message.
#[derive(Debug, Clone)]
pub(crate) struct CallError {
    pub code: c_int,
    pub msg: String,
}

impl CallError {
    /// Maps the code to the matching [`BridgeError`] variant.
    pub(crate) fn into_bridge(self, op: &'static str) -> BridgeError {
        match self.code {
            TSNB_ETIMEDOUT => BridgeError::Timeout {
                op,
                detail: self.msg,
            },
            TSNB_ENEEDSLOGIN => BridgeError::NeedsLogin { url: self.msg },
            TSNB_EINVAL => BridgeError::InvalidConfig(self.msg),
            TSNB_EBADF => BridgeError::Closed { op },
            code => BridgeError::Bridge {
                op,
                code,
                msg: self.msg,
            },
        }
    }
}

const ERRLEN: usize = 2048;

fn cstring(s: &str) -> Result<CString, CallError> {
    CString::new(s).map_err(|_| CallError {
        code: TSNB_EINVAL,
        msg: format!("{s:?} contains a NUL byte"),
    })
}

/// The NUL-terminated prefix of `buf`, lossily as UTF-8.
fn buf_to_string(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Runs a call that takes an error buffer.
fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), CallError> {
    let mut err = vec![0u8; ERRLEN];
    let rc = f(err.as_mut_ptr().cast(), err.len());
    if rc == TSNB_OK {
        Ok(())
    } else {
        Err(CallError {
            code: rc,
            msg: buf_to_string(&err),
        })
    }
}

/// Runs an (idempotent) call that writes JSON, growing the buffer on ERANGE.
fn call_json(
    mut f: impl FnMut(*mut c_char, usize, *mut usize, *mut c_char, usize) -> c_int,
) -> Result<Vec<u8>, CallError> {
    let mut cap = 4096;
    for _ in 0..5 {
        let mut out = vec![0u8; cap];
        let mut needed = 0usize;
        let mut err = vec![0u8; ERRLEN];
        let rc = f(
            out.as_mut_ptr().cast(),
            out.len(),
            &mut needed,
            err.as_mut_ptr().cast(),
            err.len(),
        );
        match rc {
            TSNB_OK => {
                let end = out.iter().position(|&b| b == 0).unwrap_or(out.len());
                out.truncate(end);
                return Ok(out);
            }
            TSNB_ERANGE if needed > cap => cap = needed,
            code => {
                return Err(CallError {
                    code,
                    msg: buf_to_string(&err),
                });
            }
        }
    }
    Err(CallError {
        code: TSNB_ERANGE,
        msg: "the bridge's answer kept growing".into(),
    })
}

/// Takes ownership of an fd the bridge handed over.
fn own_fd(fd: c_int) -> Result<OwnedFd, CallError> {
    if fd < 0 {
        return Err(CallError {
            code: TSNB_EINVAL,
            msg: format!("the bridge returned an invalid fd {fd}"),
        });
    }
    // SAFETY: the bridge created this fd for this call and handed it over;
    // nothing else in the process owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The read end of the bridge's log pipe, the first time only.
/// execve through Go (which first restores the soft RLIMIT_NOFILE the
/// process started with); returns only on failure.
pub(crate) fn exec(path: &CStr, argv: &[CString], env: &[CString]) -> CallError {
    let too_many = || CallError {
        code: TSNB_EINVAL,
        msg: "too many arguments or environment entries".into(),
    };
    let (Ok(argc), Ok(envc)) = (c_int::try_from(argv.len()), c_int::try_from(env.len())) else {
        return too_many();
    };
    let argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    let env_ptrs: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).collect();
    let res = call(|eb, el| {
        // SAFETY: path and every pointer in argv_ptrs/env_ptrs point at
        // NUL-terminated strings that outlive the call; the arrays hold
        // argc and envc entries; the error buffer is valid for writes.
        unsafe {
            tsnetbridge_exec(
                path.as_ptr(),
                argv_ptrs.as_ptr(),
                argc,
                env_ptrs.as_ptr(),
                envc,
                eb,
                el,
            )
        }
    });
    match res {
        Err(e) => e,
        Ok(()) => CallError {
            code: TSNB_EINVAL,
            msg: "exec returned without an error".into(),
        },
    }
}

pub(crate) fn take_log_fd() -> Option<OwnedFd> {
    let mut fd: c_int = -1;
    // SAFETY: fd is valid for writes for the duration of the call.
    let rc = unsafe { tsnetbridge_take_log_fd(&mut fd) };
    if rc == TSNB_OK { own_fd(fd).ok() } else { None }
}

/// The soft and hard RLIMIT_NOFILE the process was started with.
pub(crate) fn orig_nofile() -> Option<(u64, u64)> {
    let (mut cur, mut max) = (0u64, 0u64);
    // SAFETY: both pointers are valid for writes for the duration of the call.
    let rc = unsafe { tsnetbridge_orig_nofile(&mut cur, &mut max) };
    (rc == TSNB_OK).then_some((cur, max))
}

pub(crate) fn node_new(config_json: &str) -> Result<i64, CallError> {
    let cfg = cstring(config_json)?;
    let mut node = 0i64;
    call(|eb, el| {
        // SAFETY: cfg is NUL-terminated and outlives the call; node and the
        // error buffer are valid for writes of their sizes.
        unsafe { tsnetbridge_node_new(cfg.as_ptr(), &mut node, eb, el) }
    })?;
    Ok(node)
}

pub(crate) fn node_up(node: i64, timeout_ms: i64) -> Result<(), CallError> {
    call(|eb, el| {
        // SAFETY: the error buffer is valid for writes of `el` bytes.
        unsafe { tsnetbridge_node_up(node, timeout_ms, eb, el) }
    })
}

pub(crate) fn node_status(node: i64) -> Result<Vec<u8>, CallError> {
    call_json(|out, outlen, needed, eb, el| {
        // SAFETY: out, needed and the error buffer are valid for writes of
        // their sizes for the duration of the call.
        unsafe { tsnetbridge_node_status(node, out, outlen, needed, eb, el) }
    })
}

pub(crate) fn node_ips(node: i64) -> Result<Vec<u8>, CallError> {
    call_json(|out, outlen, needed, eb, el| {
        // SAFETY: as in node_status.
        unsafe { tsnetbridge_node_ips(node, out, outlen, needed, eb, el) }
    })
}

pub(crate) fn node_peers(node: i64) -> Result<Vec<u8>, CallError> {
    call_json(|out, outlen, needed, eb, el| {
        // SAFETY: as in node_status.
        unsafe { tsnetbridge_node_peers(node, out, outlen, needed, eb, el) }
    })
}

/// Listens on `port`: (listener handle, SOCK_SEQPACKET socket, actual port).
pub(crate) fn node_listen(node: i64, port: u16) -> Result<(i64, OwnedFd, u16), CallError> {
    let (mut listener, mut fd, mut actual) = (0i64, -1 as c_int, 0u16);
    call(|eb, el| {
        // SAFETY: every out pointer and the error buffer are valid for writes.
        unsafe { tsnetbridge_node_listen(node, port, &mut listener, &mut fd, &mut actual, eb, el) }
    })?;
    Ok((listener, own_fd(fd)?, actual))
}

pub(crate) fn listener_close(listener: i64) -> Result<(), CallError> {
    call(|eb, el| {
        // SAFETY: the error buffer is valid for writes of `el` bytes.
        unsafe { tsnetbridge_listener_close(listener, eb, el) }
    })
}

pub(crate) fn node_dial(node: i64, addr: &str, timeout_ms: i64) -> Result<OwnedFd, CallError> {
    let addr = cstring(addr)?;
    let mut fd: c_int = -1;
    call(|eb, el| {
        // SAFETY: addr is NUL-terminated and outlives the call; fd and the
        // error buffer are valid for writes.
        unsafe { tsnetbridge_node_dial(node, addr.as_ptr(), timeout_ms, &mut fd, eb, el) }
    })?;
    own_fd(fd)
}

pub(crate) fn node_whois(node: i64, addr: &str, timeout_ms: i64) -> Result<Vec<u8>, CallError> {
    let addr = cstring(addr)?;
    call_json(|out, outlen, needed, eb, el| {
        // SAFETY: addr is NUL-terminated and outlives the call; the buffers
        // are valid for writes of their sizes.
        unsafe {
            tsnetbridge_node_whois(node, addr.as_ptr(), timeout_ms, out, outlen, needed, eb, el)
        }
    })
}

pub(crate) fn node_loopback(node: i64) -> Result<Vec<u8>, CallError> {
    call_json(|out, outlen, needed, eb, el| {
        // SAFETY: as in node_status.
        unsafe { tsnetbridge_node_loopback(node, out, outlen, needed, eb, el) }
    })
}

pub(crate) fn node_close(node: i64) -> Result<(), CallError> {
    call(|eb, el| {
        // SAFETY: the error buffer is valid for writes of `el` bytes.
        unsafe { tsnetbridge_node_close(node, eb, el) }
    })
}

#[cfg(feature = "localnet")]
pub(crate) fn localnet_start(opts_json: &str) -> Result<i64, CallError> {
    let opts = cstring(opts_json)?;
    let mut ln = 0i64;
    call(|eb, el| {
        // SAFETY: opts is NUL-terminated and outlives the call; ln and the
        // error buffer are valid for writes.
        unsafe { tsnetbridge_localnet_start(opts.as_ptr(), &mut ln, eb, el) }
    })?;
    Ok(ln)
}

#[cfg(feature = "localnet")]
pub(crate) fn localnet_info(ln: i64) -> Result<Vec<u8>, CallError> {
    call_json(|out, outlen, needed, eb, el| {
        // SAFETY: as in node_status.
        unsafe { tsnetbridge_localnet_info(ln, out, outlen, needed, eb, el) }
    })
}

#[cfg(feature = "localnet")]
pub(crate) fn localnet_grant(ln: i64, grant_json: &str) -> Result<(), CallError> {
    let grant = cstring(grant_json)?;
    call(|eb, el| {
        // SAFETY: grant is NUL-terminated and outlives the call; the error
        // buffer is valid for writes.
        unsafe { tsnetbridge_localnet_grant(ln, grant.as_ptr(), eb, el) }
    })
}

#[cfg(feature = "localnet")]
pub(crate) fn localnet_approve(ln: i64, auth_url: &str) -> Result<(), CallError> {
    let url = cstring(auth_url)?;
    call(|eb, el| {
        // SAFETY: url is NUL-terminated and outlives the call; the error
        // buffer is valid for writes.
        unsafe { tsnetbridge_localnet_approve(ln, url.as_ptr(), eb, el) }
    })
}

#[cfg(feature = "localnet")]
pub(crate) fn localnet_close(ln: i64) -> Result<(), CallError> {
    call(|eb, el| {
        // SAFETY: the error buffer is valid for writes of `el` bytes.
        unsafe { tsnetbridge_localnet_close(ln, eb, el) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_handles_are_reported_as_closed() {
        let err = node_up(i64::MAX, 10).unwrap_err();
        assert_eq!(err.code, TSNB_EBADF, "{err:?}");
        assert!(matches!(
            err.into_bridge("up"),
            BridgeError::Closed { op: "up" }
        ));
    }

    #[test]
    fn error_messages_are_nul_terminated_and_complete() {
        let err = node_new(r#"{"hostname": "-bad-", "state_dir": "/tmp/x"}"#).unwrap_err();
        assert_eq!(err.code, TSNB_EINVAL);
        assert!(err.msg.contains("-bad-"), "{}", err.msg);
        let err = node_new("not json").unwrap_err();
        assert_eq!(err.code, TSNB_EINVAL);
    }

    #[test]
    fn json_results_grow_the_buffer_when_needed() {
        // A fake call that needs 10 000 bytes.
        let mut calls = 0;
        let got = call_json(|out, outlen, needed, _eb, _el| {
            calls += 1;
            let data = vec![b'x'; 9_999];
            // SAFETY: `needed` points at call_json's local.
            unsafe { *needed = data.len() + 1 };
            if outlen < data.len() + 1 {
                return TSNB_ERANGE;
            }
            // SAFETY: out is valid for outlen >= data.len() + 1 bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), out.cast(), data.len());
                *out.add(data.len()) = 0;
            }
            TSNB_OK
        })
        .unwrap();
        assert_eq!(got.len(), 9_999);
        assert_eq!(calls, 2);
    }

    #[test]
    fn not_found_maps_to_the_bridge_variant_with_its_code() {
        let err = CallError {
            code: TSNB_ENOENT,
            msg: "m".into(),
        };
        assert!(matches!(
            err.into_bridge("whois"),
            BridgeError::Bridge {
                code: TSNB_ENOENT,
                ..
            }
        ));
    }
}
