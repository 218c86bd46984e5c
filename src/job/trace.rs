//! W3C Trace Context for a job: the trace it belongs to, and the id of its own span, chosen
//! at submission and stored with it, so that every call and callback attempt, on any node
//! and after any restart, is a child of the same job span.

use serde::{Deserialize, Serialize};

/// A job's place in a trace (stored in its options as `trace`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobTrace {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// The job's own span: 16 lowercase hex digits.
    pub span_id: String,
    /// The span of the submitting request's `traceparent`, which the job's span is a
    /// child of; none when the job started its trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// The `sampled` flag, passed on as received (set for a new trace).
    pub sampled: bool,
    /// The submitting request's `tracestate`, passed on unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl JobTrace {
    /// The job's trace from the submitting request's `traceparent` and `tracestate`: its
    /// trace, with the job's span a child of the request's. Without a valid `traceparent`
    /// (a missing, malformed or all-zero one is ignored, as the W3C recommendation says),
    /// the job starts a new trace, and `tracestate` is dropped with it.
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> JobTrace {
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent, sampled)) => JobTrace {
                trace_id,
                span_id: new_span_id(),
                parent_span_id: Some(parent),
                sampled,
                state: tracestate
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.len() <= 512 && s.is_ascii())
                    .map(str::to_string),
            },
            None => JobTrace {
                trace_id: hex(&rand::random::<[u8; 16]>()),
                span_id: new_span_id(),
                parent_span_id: None,
                sampled: true,
                state: None,
            },
        }
    }

    /// The `traceparent` of a request made by the span `span_id` in this trace.
    pub fn traceparent(&self, span_id: &str) -> String {
        let flags = if self.sampled { "01" } else { "00" };
        format!("00-{}-{span_id}-{flags}", self.trace_id)
    }
}

/// A new random span id (16 hex digits, never all zero).
pub fn new_span_id() -> String {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return hex(&id);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// `version-traceid-parentid-flags` as W3C Trace Context has it: lowercase hex, neither id
/// all zeros, version `ff` invalid; a version above `00` may carry more fields after.
fn parse_traceparent(text: &str) -> Option<(String, String, bool)> {
    let text = text.trim();
    let mut parts = text.splitn(5, '-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    let lower_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = lower_hex(version, 2)
        && version != "ff"
        && (version != "00" || rest.is_none())
        && lower_hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && lower_hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && lower_hex(flags, 2);
    if !valid {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace.to_string(), parent.to_string(), sampled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_joined_and_anything_else_starts_a_trace() {
        let t = JobTrace::from_headers(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("congo=t61rcWkgMzE"),
        );
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert!(t.sampled);
        assert_eq!(t.state.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(t.span_id.len(), 16);
        assert_eq!(
            t.traceparent("b7ad6b7169203331"),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
        );
        let unsampled = JobTrace::from_headers(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            None,
        );
        assert!(!unsampled.sampled);
        // A later version with more fields is read by its first four.
        assert!(
            JobTrace::from_headers(
                Some("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever"),
                None
            )
            .parent_span_id
            .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let t = JobTrace::from_headers(Some(bad), Some("a=b"));
            assert_eq!(t.parent_span_id, None, "{bad}");
            assert_eq!(t.state, None, "{bad}");
            assert_eq!(t.trace_id.len(), 32);
            assert!(t.sampled);
        }
    }
}
