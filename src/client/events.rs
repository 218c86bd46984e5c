//! The job's event stream as the client reads it: Server-Sent Events parsed from the
//! response body as its chunks arrive.

use std::time::Duration;

/// Longest an event stream may stay silent. The server sends a keep-alive comment every
/// 15 s, so this much silence means the connection is gone without a word (a dropped NAT
/// entry, a suspended laptop).
const EVENTS_IDLE: Duration = Duration::from_secs(45);

/// One Server-Sent Event.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerEvent {
    pub event: String,
    pub data: String,
    /// The stream's last event id once this event is dispatched.
    pub id: Option<String>,
}

/// An open event stream.
pub struct EventStream {
    response: reqwest::Response,
    parser: SseParser,
    ready: std::vec::IntoIter<ServerEvent>,
}

impl EventStream {
    pub(super) fn new(response: reqwest::Response) -> Self {
        EventStream {
            response,
            parser: SseParser::default(),
            ready: Vec::new().into_iter(),
        }
    }

    /// The next event; `None` when the stream ended, was cut, or stayed silent longer than
    /// [`EVENTS_IDLE`] (the caller reconnects if the job is not finished).
    pub async fn next(&mut self) -> Option<ServerEvent> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            match tokio::time::timeout(EVENTS_IDLE, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.ready = self.parser.push(&chunk).into_iter(),
                Ok(Ok(None) | Err(_)) | Err(_) => return None,
            }
        }
    }
}

/// The event-stream format (the `text/event-stream` of the HTML standard), fed in chunks
/// that may split a line anywhere. A few lines of parsing are not worth a crate.
#[derive(Default)]
struct SseParser {
    /// An incomplete line from the previous chunk.
    line: Vec<u8>,
    event: String,
    data: String,
    last_id: Option<String>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Vec<ServerEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                // A blank line dispatches what was gathered; an event without data is none.
                let event = std::mem::take(&mut self.event);
                let data = std::mem::take(&mut self.data);
                if !data.is_empty() {
                    events.push(ServerEvent {
                        event: if event.is_empty() {
                            "message".into()
                        } else {
                            event
                        },
                        data: data.strip_suffix('\n').unwrap_or(&data).to_string(),
                        id: self.last_id.clone(),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment: the server's keep-alive
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = value.to_string(),
                "data" => {
                    self.data.push_str(value);
                    self.data.push('\n');
                }
                "id" => self.last_id = Some(value.to_string()),
                _ => {} // `retry` and unknown fields
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_streams_parse_across_chunk_boundaries() {
        let stream = b": keep-alive\n\nevent: progress\nid: 0\ndata: {\"a\":1}\n\n\
                       event:task_failed\r\nid:1\r\ndata: x\r\ndata: y\r\n\r\n\
                       data: plain\n\nevent: finished\n\n";
        let want = vec![
            ServerEvent {
                event: "progress".into(),
                data: r#"{"a":1}"#.into(),
                id: Some("0".into()),
            },
            ServerEvent {
                event: "task_failed".into(),
                data: "x\ny".into(),
                id: Some("1".into()),
            },
            ServerEvent {
                event: "message".into(),
                data: "plain".into(),
                id: Some("1".into()),
            },
        ];
        for size in [1, 2, 7, stream.len()] {
            let mut parser = SseParser::default();
            let got: Vec<ServerEvent> = stream.chunks(size).flat_map(|c| parser.push(c)).collect();
            assert_eq!(got, want, "chunks of {size}");
        }
    }
}
