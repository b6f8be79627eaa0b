//! A parser of server-sent events (`text/event-stream`, as the HTML
//! standard defines it): lines end with `\n`, `\r\n` or `\r`; `event:`,
//! `id:` and `data:` fields (several `data:` lines join with `\n`); a
//! line starting with `:` is a comment (the daemon's heartbeat); an empty
//! line ends an event. Fed bytes as they arrive, it yields each item once
//! complete, and bounds what it buffers.

use std::collections::VecDeque;

/// The longest line accepted (the daemon's lines are far shorter: an
/// event's data is one line of JSON of at most 16 KiB of output, escaped).
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its `event:` name (`message` when it has none).
    pub name: String,
    /// Its `id:`, if it carried one.
    pub id: Option<u64>,
    /// Its `data:` lines, joined with `\n`.
    pub data: String,
}

impl Event {
    /// The data as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }
}

/// What a stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An event.
    Event(Event),
    /// A comment line (`: heartbeat` gives `"heartbeat"`).
    Comment(String),
}

/// Why a stream cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line went on past [`MAX_LINE_BYTES`].
    #[error("a line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// A line is not UTF-8.
    #[error("a line that is not UTF-8")]
    NotUtf8,
}

/// The parser; see the module documentation.
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of the line not ended yet.
    line: Vec<u8>,
    /// The last byte fed was a `\r`: a `\n` right after it ends nothing.
    after_cr: bool,
    ready: VecDeque<Item>,
    name: Option<String>,
    id: Option<u64>,
    data: Option<String>,
}

impl Parser {
    /// Parses `bytes`, the next part of the stream.
    ///
    /// # Errors
    ///
    /// A line too long or not UTF-8.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), SseError> {
        if self.after_cr && bytes.first() == Some(&b'\n') {
            bytes = &bytes[1..];
        }
        self.after_cr = false;
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.push_line_bytes(&bytes[..end])?;
            let line = std::mem::take(&mut self.line);
            self.end_line(&line)?;
            let crlf = bytes[end] == b'\r';
            bytes = &bytes[end + 1..];
            if crlf {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
        self.push_line_bytes(bytes)
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            return Err(SseError::LineTooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self, line: &[u8]) -> Result<(), SseError> {
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                self.ready.push_back(Item::Event(Event {
                    name: self.name.take().unwrap_or_else(|| "message".into()),
                    id: self.id.take(),
                    data,
                }));
            }
            self.name = None;
            self.id = None;
            return Ok(());
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            self.ready.push_back(Item::Comment(comment.to_string()));
            return Ok(());
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.name = Some(value.to_string()),
            "id" => self.id = value.parse().ok(),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
        Ok(())
    }

    /// The next complete item, if any.
    ///
    /// # Errors
    ///
    /// Never today; kept for a parser that reports late.
    pub fn next_item(&mut self) -> Result<Option<Item>, SseError> {
        Ok(self.ready.pop_front())
    }

    /// At the end of the stream: what is left complete (an event without
    /// its closing empty line is dropped, as browsers do).
    pub fn finish(&mut self) -> Option<Item> {
        self.ready.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<Item> {
        let mut parser = Parser::default();
        let mut items = Vec::new();
        for chunk in chunks {
            parser.feed(chunk).unwrap();
            while let Some(item) = parser.next_item().unwrap() {
                items.push(item);
            }
        }
        items.extend(parser.finish());
        items
    }

    fn event(name: &str, id: Option<u64>, data: &str) -> Item {
        Item::Event(Event {
            name: name.into(),
            id,
            data: data.into(),
        })
    }

    #[test]
    fn events_comments_and_every_line_ending() {
        let text = b"event: job.status\nid: 1\ndata: {\"a\":1}\n\n: heartbeat\r\n\r\ndata:x\rdata: y\r\rid: z\nevent: e\ndata\n\nevent: cut";
        let expected = vec![
            event("job.status", Some(1), "{\"a\":1}"),
            Item::Comment("heartbeat".into()),
            event("message", None, "x\ny"),
            event("e", None, ""),
        ];
        assert_eq!(parse(&[text]), expected);
        // The same, one byte at a time (a `\r\n` split across two reads).
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(parse(&bytes), expected);
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut parser = Parser::default();
        let chunk = vec![b'a'; 1 << 20];
        let mut result = Ok(());
        for _ in 0..5 {
            result = result.and_then(|()| parser.feed(&chunk));
        }
        assert_eq!(result, Err(SseError::LineTooLong));
    }
}
