//! Forwards the Go side's log lines (tsnet backend and user logs, Go's `log`
//! package, the local tailnet) into `tracing`: target `tsnet`, level debug,
//! with the line's source (`node/<hostname>/user`, `localnet`, ...) as a field.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::sync::OnceLock;

use super::ffi;

static FORWARDER: OnceLock<()> = OnceLock::new();

/// Starts the forwarding thread once per process. Called before the first
/// node or local tailnet is created; lines logged earlier were queued in Go.
pub(crate) fn ensure_forwarding() {
    FORWARDER.get_or_init(|| {
        let Some(fd) = ffi::take_log_fd() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("tsnet-logs".into())
            .spawn(move || forward(BufReader::new(File::from(fd))));
        if let Err(err) = spawned {
            tracing::warn!(%err, "could not start the tsnet log forwarder; tsnet logs are dropped");
        }
    });
}

/// Whether tsnet's verbose backend log is wanted (checked when a node is
/// created, so a disabled log costs nothing in Go).
pub(crate) fn backend_logs_enabled() -> bool {
    tracing::enabled!(target: "tsnet", tracing::Level::DEBUG)
}

fn forward(mut reader: impl BufRead) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\n');
        let (source, msg) = text.split_once('\t').unwrap_or(("bridge", text));
        tracing::debug!(target: "tsnet", source, "{msg}");
    }
}
