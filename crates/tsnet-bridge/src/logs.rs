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
        let (source, msg) = parse_line(&line);
        tracing::debug!(target: "tsnet", source, "{msg}");
    }
}

/// The source and the message of one forwarded line (`source\tmessage\n`),
/// the message without control characters: tsnet marks structured lines
/// with a NUL (`[v\x00JSON]`), which makes tools such as grep treat a log
/// file as binary.
fn parse_line(line: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\n');
    let (source, msg) = text.split_once('\t').unwrap_or(("bridge", text));
    let msg = msg
        .chars()
        .filter(|c| *c == '\t' || !c.is_control())
        .collect();
    (source.to_string(), msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_lose_their_control_characters() {
        let (source, msg) = parse_line(b"node/tk/backend\t[v\x00JSON]1{\"a\":1}\x1b[0m\n");
        assert_eq!(source, "node/tk/backend");
        assert_eq!(msg, "[vJSON]1{\"a\":1}[0m");
        assert_eq!(parse_line(b"no tab\n"), ("bridge".into(), "no tab".into()));
    }
}
