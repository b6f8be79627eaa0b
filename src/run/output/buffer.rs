//! One stream's kept bytes: made UTF-8 as they arrive, capped, and cut
//! into line events by [`next_piece`], the one rule both the writer (to
//! count events) and every reader (to find them) apply.

use std::sync::Arc;

use super::{MAX_LINE_BYTES, Pipe};
use crate::run::result::{JobResult, sent_prefix};

#[derive(Debug)]
pub(super) struct Buffer {
    pub(super) data: Data,
    /// Start of the first line not counted as an event yet.
    pub(super) counted: usize,
    /// No more bytes come: end of file, the cap reached, or taken.
    pub(super) closed: bool,
    /// Bytes were dropped at the cap.
    pub(super) truncated: bool,
    /// An incomplete UTF-8 sequence carried to the next write.
    pub(super) pending: Vec<u8>,
    /// Index bytes attributed to this stream.
    pub(super) index_bytes: usize,
    /// What the kept bytes take JSON-escaped, as a job result sends them:
    /// what the cap counts.
    pub(super) sent: usize,
}

#[derive(Debug)]
pub(super) enum Data {
    Live(Vec<u8>),
    /// Moved into the job's result; `usize` is its length.
    Taken(usize),
    /// The job's result holds the bytes.
    Shared(Arc<JobResult>, Pipe),
    /// The result does not hold the bytes that were taken (its task ended
    /// early): the lines cannot be read any more.
    Lost,
}

impl Data {
    pub(super) fn bytes(&self) -> Result<&[u8], Unreadable> {
        match self {
            Data::Live(v) => Ok(v),
            Data::Shared(result, Pipe::Stdout) => Ok(result.stdout.as_bytes()),
            Data::Shared(result, Pipe::Stderr) => Ok(result.stderr.as_bytes()),
            Data::Taken(_) => Err(Unreadable::InFlight),
            Data::Lost => Err(Unreadable::Lost),
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Data::Taken(len) => *len,
            other => other.bytes().map_or(0, <[u8]>::len),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unreadable {
    /// Between the end of the run and the stored result.
    InFlight,
    Lost,
}

impl Buffer {
    pub(super) fn new() -> Self {
        Buffer {
            data: Data::Live(Vec::new()),
            counted: 0,
            closed: false,
            truncated: false,
            pending: Vec::new(),
            index_bytes: 0,
            sent: 0,
        }
    }

    /// Bytes that may still be kept, counted as sent (JSON-escaped): the
    /// cap, less what is kept, less the index bytes past the free
    /// allowance.
    pub(super) fn room(&self, cap: usize) -> usize {
        let excess = self.index_bytes.saturating_sub(free_index_bytes(cap));
        cap.saturating_sub(self.sent + excess)
    }

    /// Keeps `input` (raw bytes, an incomplete UTF-8 sequence at its end
    /// carried over) as UTF-8 text, up to the cap.
    pub(super) fn push_bytes(&mut self, input: &[u8], cap: usize) {
        let mut rest = input;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.push_text(text, cap);
                    return;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    if let Ok(text) = std::str::from_utf8(valid)
                        && !self.push_text(text, cap)
                    {
                        return;
                    }
                    match e.error_len() {
                        Some(n) => {
                            if !self.push_text("\u{FFFD}", cap) {
                                return;
                            }
                            rest = &after[n..];
                        }
                        None => {
                            self.pending = after.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Keeps as much of `text` as fits, JSON-escaped, cut at a character
    /// boundary; returns whether all of it did. A cut closes the stream:
    /// what is kept stays a prefix of what was written.
    fn push_text(&mut self, text: &str, cap: usize) -> bool {
        let room = self.room(cap);
        let Data::Live(data) = &mut self.data else {
            return false;
        };
        if self.closed {
            self.truncated |= !text.is_empty();
            return false;
        }
        let (keep, sent) = sent_prefix(text, room);
        reserve_within(data, keep, cap);
        data.extend_from_slice(&text.as_bytes()[..keep]);
        self.sent += sent;
        if keep < text.len() {
            self.truncated = true;
        }
        if keep < text.len() || sent == room {
            // Full: what is kept is final, its last line can go out.
            self.closed = true;
            self.pending.clear();
        }
        keep == text.len()
    }

    /// The end of the input: a carried incomplete sequence becomes U+FFFD.
    pub(super) fn finish_input(&mut self, cap: usize) {
        if !self.pending.is_empty() {
            self.pending.clear();
            self.push_text("\u{FFFD}", cap);
        }
        self.closed = true;
    }
}

/// The index bytes a stream with `cap` gets without counting them against
/// the cap.
fn free_index_bytes(cap: usize) -> usize {
    cap / 16 + 1024
}

/// Grows `data` for `additional` more bytes, doubling but never past
/// `limit` (the cap), so that a full buffer holds no spare capacity.
fn reserve_within(data: &mut Vec<u8>, additional: usize, limit: usize) {
    let needed = data.len() + additional;
    if needed <= data.capacity() {
        return;
    }
    let target = (data.capacity() * 2)
        .max(needed)
        .max(4096)
        .min(limit.max(needed));
    data.reserve_exact(target - data.len());
}

/// One line event's place in its stream's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    /// Where the next piece starts.
    pub(super) end: usize,
    /// Where the line's text ends (before `\n` or `\r\n`).
    pub(super) text_end: usize,
}

/// The line event that starts at `at` in `bytes` (valid UTF-8), if it is
/// complete: it ends at a newline, or is cut at [`MAX_LINE_BYTES`], or is
/// what is left of a `closed` stream. The same bytes always give the same
/// pieces, which is what makes event ids fixed: a piece is only decided
/// once the bytes that decide it are there (a newline, or enough bytes to
/// know the line is too long).
pub(super) fn next_piece(bytes: &[u8], at: usize, closed: bool) -> Option<Piece> {
    let available = bytes.len();
    if at >= available {
        return None;
    }
    let window = &bytes[at..available.min(at + MAX_LINE_BYTES + 2)];
    if let Some(i) = memchr::memchr(b'\n', window) {
        let newline = at + i;
        let text_end = if newline > at && bytes[newline - 1] == b'\r' {
            newline - 1
        } else {
            newline
        };
        if text_end - at <= MAX_LINE_BYTES {
            return Some(Piece {
                end: newline + 1,
                text_end,
            });
        }
    } else if !closed && window.len() < MAX_LINE_BYTES + 2 {
        return None;
    }
    if available - at <= MAX_LINE_BYTES {
        // The last partial line of a closed stream.
        return Some(Piece {
            end: available,
            text_end: available,
        });
    }
    // Too long: cut at the last character boundary within the limit.
    let mut cut = at + MAX_LINE_BYTES;
    while cut > at && bytes[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    if cut == at {
        cut = at + MAX_LINE_BYTES;
    }
    Some(Piece {
        end: cut,
        text_end: cut,
    })
}
