//! How the backends write the domain's values, where they write them alike: the status and
//! state codes of the SQL backends, and the JSON text, options and ids every backend keeps
//! as text.

use std::fmt;
use std::sync::Arc;

use serde_json::value::RawValue;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgHasArrayType, PgTypeInfo, Postgres};
use sqlx::sqlite::{Sqlite, SqliteTypeInfo};
use sqlx::{Database, Decode, Encode, Type};

use super::{StoreError, StoreResult};
use crate::job::{CallbackState, JobId, JobOptions, JobStatus, TaskCall, TaskStatus};

/// A job or task status, or a callback's delivery state, as the SQL backends store it:
/// SQLite as INTEGER, PostgreSQL as SMALLINT. Both backends bind and read this type, and the
/// numbers are written only in [`job_code`], [`task_code`] and the callback constants below.
/// They are stored in databases, and the migrations' partial indexes name them: they never
/// change.
///
/// A statement that tests a fixed status has the code in its text, formatted once from
/// these constants, rather than bound: a partial index (`WHERE status = 0`) serves only a
/// query whose text implies its condition, which a parameter does not (PostgreSQL's generic
/// plan of a prepared statement could not use the index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Code(i64);

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A job status's code.
pub(super) const fn job_code(s: JobStatus) -> Code {
    Code(match s {
        // Never stored: a scheduled job is a pending one (`JobStatus::shown`).
        JobStatus::Scheduled | JobStatus::Pending => 0,
        JobStatus::Running => 1,
        JobStatus::Complete => 2,
        JobStatus::Failed => 3,
        JobStatus::Cancelled => 4,
        JobStatus::Paused => 5,
    })
}

/// A task status's code.
pub(super) const fn task_code(s: TaskStatus) -> Code {
    Code(match s {
        TaskStatus::Pending => 0,
        TaskStatus::Running => 1,
        TaskStatus::Complete => 2,
        TaskStatus::Failed => 3,
        TaskStatus::Cancelled => 4,
    })
}

pub(super) const JOB_PENDING: Code = job_code(JobStatus::Pending);
pub(super) const JOB_RUNNING: Code = job_code(JobStatus::Running);
pub(super) const JOB_COMPLETE: Code = job_code(JobStatus::Complete);
pub(super) const JOB_FAILED: Code = job_code(JobStatus::Failed);
pub(super) const JOB_CANCELLED: Code = job_code(JobStatus::Cancelled);
pub(super) const JOB_PAUSED: Code = job_code(JobStatus::Paused);

pub(super) const TASK_PENDING: Code = task_code(TaskStatus::Pending);
pub(super) const TASK_RUNNING: Code = task_code(TaskStatus::Running);
pub(super) const TASK_COMPLETE: Code = task_code(TaskStatus::Complete);
pub(super) const TASK_FAILED: Code = task_code(TaskStatus::Failed);
pub(super) const TASK_CANCELLED: Code = task_code(TaskStatus::Cancelled);

/// A callback owed: a finished job with a callback URL has its delivery record from the
/// transaction that finished it.
pub(super) const CALLBACK_PENDING: Code = Code(1);
pub(super) const CALLBACK_DELIVERED: Code = Code(2);
/// Given up on after its last attempt.
pub(super) const CALLBACK_FAILED: Code = Code(3);

const JOB_STATUSES: [JobStatus; 6] = [
    JobStatus::Pending,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Complete,
    JobStatus::Failed,
    JobStatus::Cancelled,
];

const TASK_STATUSES: [TaskStatus; 5] = [
    TaskStatus::Pending,
    TaskStatus::Running,
    TaskStatus::Complete,
    TaskStatus::Failed,
    TaskStatus::Cancelled,
];

pub(super) fn job_status_from(code: Code) -> StoreResult<JobStatus> {
    JOB_STATUSES
        .into_iter()
        .find(|&s| job_code(s) == code)
        .ok_or_else(|| StoreError::Other(format!("unknown job status code {code}")))
}

pub(super) fn task_status_from(code: Code) -> StoreResult<TaskStatus> {
    TASK_STATUSES
        .into_iter()
        .find(|&s| task_code(s) == code)
        .ok_or_else(|| StoreError::Other(format!("unknown task status code {code}")))
}

/// A job's callback as the API shows it, from its URL and its delivery record's state
/// (none until the job finishes).
pub(super) fn callback_state(has_url: bool, state: Option<Code>) -> CallbackState {
    match (has_url, state) {
        (false, _) => CallbackState::None,
        (true, None | Some(CALLBACK_PENDING)) => CallbackState::Pending,
        (true, Some(CALLBACK_DELIVERED)) => CallbackState::Delivered,
        (true, Some(_)) => CallbackState::Failed,
    }
}

impl Type<Sqlite> for Code {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Code {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer<'q>,
    ) -> Result<IsNull, BoxDynError> {
        <i64 as Encode<Sqlite>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Code {
    fn decode(value: <Sqlite as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        <i64 as Decode<Sqlite>>::decode(value).map(Code)
    }
}

impl Type<Postgres> for Code {
    fn type_info() -> PgTypeInfo {
        <i16 as Type<Postgres>>::type_info()
    }
}

impl PgHasArrayType for Code {
    fn array_type_info() -> PgTypeInfo {
        <i16 as PgHasArrayType>::array_type_info()
    }
}

impl Encode<'_, Postgres> for Code {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer<'_>,
    ) -> Result<IsNull, BoxDynError> {
        // Every code fits: only the constants above are written.
        <i16 as Encode<Postgres>>::encode_by_ref(&i16::try_from(self.0)?, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Code {
    fn decode(value: <Postgres as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        <i16 as Decode<Postgres>>::decode(value).map(|c| Code(c.into()))
    }
}

/// Stored JSON text (params, a result, an error) back as JSON, exactly as it was written.
pub(super) fn raw(text: Option<String>) -> StoreResult<Option<Box<RawValue>>> {
    text.map(|t| {
        RawValue::from_string(t)
            .map_err(|e| StoreError::Other(format!("stored JSON is invalid: {e}")))
    })
    .transpose()
}

/// A task's stored call settings (`None` for a task without any).
pub(super) fn parse_call(text: Option<&str>) -> StoreResult<Option<TaskCall>> {
    text.map(|text| {
        serde_json::from_str(text)
            .map_err(|e| StoreError::Other(format!("stored call settings are invalid: {e}")))
    })
    .transpose()
}

/// The options a claimed task is called with: its job's, or, for a task with stored call
/// settings of its own, those over its job's.
pub(super) fn with_call(
    options: &Arc<JobOptions>,
    call: Option<&str>,
) -> StoreResult<Arc<JobOptions>> {
    Ok(match parse_call(call)? {
        Some(call) => Arc::new(options.for_task(&call)),
        None => options.clone(),
    })
}

pub(super) fn parse_options(text: &str) -> StoreResult<JobOptions> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Other(format!("stored options are invalid: {e}")))
}

/// Options as stored: JSON text, every field named.
pub(super) fn options_text(options: &JobOptions) -> StoreResult<String> {
    serde_json::to_string(options).map_err(|e| StoreError::Other(e.to_string()))
}

pub(super) fn parse_id(text: &str) -> StoreResult<JobId> {
    text.parse()
        .map_err(|e| StoreError::Other(format!("stored job id {text:?} is invalid: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for s in JOB_STATUSES {
            assert_eq!(job_status_from(job_code(s)).unwrap(), s);
        }
        for s in TASK_STATUSES {
            assert_eq!(task_status_from(task_code(s)).unwrap(), s);
        }
        assert!(job_status_from(Code(9)).is_err());
        assert!(task_status_from(Code(-1)).is_err());
    }

    /// The codes are stored, and the migrations' partial indexes and comments spell them:
    /// a change here would misread every existing database.
    #[test]
    fn codes_are_the_stored_ones() {
        let codes = |cs: &[Code]| cs.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        let numbers = ["0", "1", "2", "3", "4"];
        assert_eq!(
            codes(&[
                JOB_PENDING,
                JOB_RUNNING,
                JOB_COMPLETE,
                JOB_FAILED,
                JOB_CANCELLED
            ]),
            numbers
        );
        assert_eq!(
            codes(&[
                TASK_PENDING,
                TASK_RUNNING,
                TASK_COMPLETE,
                TASK_FAILED,
                TASK_CANCELLED
            ]),
            numbers
        );
        assert_eq!(
            codes(&[CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_FAILED]),
            ["1", "2", "3"]
        );
    }

    #[test]
    fn a_callback_is_pending_until_its_record_says_otherwise() {
        assert_eq!(callback_state(false, None), CallbackState::None);
        assert_eq!(
            callback_state(false, Some(CALLBACK_DELIVERED)),
            CallbackState::None
        );
        assert_eq!(callback_state(true, None), CallbackState::Pending);
        assert_eq!(
            callback_state(true, Some(CALLBACK_PENDING)),
            CallbackState::Pending
        );
        assert_eq!(
            callback_state(true, Some(CALLBACK_DELIVERED)),
            CallbackState::Delivered
        );
        assert_eq!(
            callback_state(true, Some(CALLBACK_FAILED)),
            CallbackState::Failed
        );
    }

    /// The text of the string literals in Rust source, one string per literal, string
    /// continuations (a `\` at the end of a line) joined. A rough lexer, enough for the
    /// backends' files: it knows comments, raw strings and character literals.
    fn string_literals(src: &str) -> Vec<String> {
        let s: Vec<char> = src.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                '/' if s.get(i + 1) == Some(&'/') => {
                    while i < s.len() && s[i] != '\n' {
                        i += 1;
                    }
                }
                // A character literal ('"', '\'', 'x'); a lifetime is left alone.
                '\'' if s.get(i + 1) == Some(&'\\') && s.get(i + 3) == Some(&'\'') => i += 3,
                '\'' if s.get(i + 2) == Some(&'\'') => i += 2,
                // A raw string: r"...", r#"..."#, br#"..."#.
                'r' if matches!(s.get(i + 1), Some('#' | '"')) => {
                    let hashes = s[i + 1..].iter().take_while(|&&c| c == '#').count();
                    if s.get(i + 1 + hashes) == Some(&'"') {
                        let from = i + 2 + hashes;
                        let mut end = from;
                        while end < s.len()
                            && !(s[end] == '"'
                                && s[end + 1..].iter().take_while(|&&c| c == '#').count() >= hashes)
                        {
                            end += 1;
                        }
                        out.push(s[from..end.min(s.len())].iter().collect());
                        i = end + hashes;
                    }
                }
                '"' => {
                    let mut text = String::new();
                    i += 1;
                    while i < s.len() && s[i] != '"' {
                        match s[i] {
                            '\\' if s.get(i + 1) == Some(&'\n') => {
                                i += 1;
                                while s.get(i + 1).is_some_and(|c| c.is_whitespace()) {
                                    i += 1;
                                }
                            }
                            '\\' => {
                                i += 1;
                                text.extend(s.get(i));
                            }
                            c => text.push(c),
                        }
                        i += 1;
                    }
                    out.push(text);
                }
                _ => {}
            }
            i += 1;
        }
        out
    }

    /// Where SQL text writes a status or state code as a number: compared with `status`
    /// or `state`, listed after `IN (`, chosen by a `CASE`, or given in a row of values.
    fn literal_codes(sql: &str) -> Vec<String> {
        let mut tokens: Vec<String> = Vec::new();
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            if c.is_alphanumeric() || "_.$?:".contains(c) {
                let mut word = c.to_lowercase().to_string();
                while let Some(&c) = chars.peek() {
                    if !(c.is_alphanumeric() || "_.$?:".contains(c)) {
                        break;
                    }
                    word.extend(c.to_lowercase());
                    chars.next();
                }
                tokens.push(word);
            } else if "=<>!".contains(c) {
                let mut op = c.to_string();
                while let Some(&c) = chars.peek().filter(|c| "=<>".contains(**c)) {
                    op.push(c);
                    chars.next();
                }
                tokens.push(op);
            } else if "(),".contains(c) {
                tokens.push(c.to_string());
            }
        }
        let number = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
        let coded = |t: &str| t.ends_with("status") || t.ends_with("state");
        let mut found = Vec::new();
        for (i, window) in tokens.windows(2).enumerate() {
            let rest = &tokens[i..];
            let hit = match (window[0].as_str(), window[1].as_str()) {
                (w, op) if coded(w) && ["=", "!=", "<>", "<", ">", "<=", ">="].contains(&op) => {
                    rest.get(2).is_some_and(|t| number(t))
                }
                (w, "in") if coded(w) => rest.get(3).is_some_and(|t| number(t)),
                (w, "not") if coded(w) => rest.get(4).is_some_and(|t| number(t)),
                ("then" | "else", n) => number(n),
                ("," | "(", n) => number(n) && rest.get(2).is_some_and(|t| t == ","),
                _ => false,
            };
            if hit {
                found.push(rest[..rest.len().min(5)].join(" "));
            }
        }
        found
    }

    #[test]
    fn literal_codes_are_found() {
        for sql in [
            "UPDATE tasks SET status = 4 WHERE job_seq = ?",
            "SELECT seq FROM jobs WHERE status IN (0, 1)",
            "WHERE j.status NOT IN (2, 3, 4)",
            "AND (c.state IS NULL OR c.state != 1)",
            "status = CASE WHEN c.n > 0 THEN 1 ELSE status END",
            "CASE WHEN a <= b THEN 2 ELSE 3 END",
            "INSERT INTO callbacks (job_seq, state, next_attempt_at) VALUES (?, 1, ?)",
            "SELECT seq, 1, at FROM unnest($1::bigint[], $2::bigint[]) AS c(seq, at)",
        ] {
            assert!(!literal_codes(sql).is_empty(), "{sql}");
        }
        for sql in [
            "UPDATE tasks SET status = ?1 WHERE status IN ($2, $3) AND n_running = 0",
            "SELECT 1 FROM tasks t WHERE t.idx = ? LIMIT 1",
            "SELECT COALESCE(MAX(fail_seq), 0) FROM tasks WHERE attempts = attempts + 1",
            "VALUES (?,?,?,?)",
        ] {
            assert_eq!(literal_codes(sql), Vec::<String>::new(), "{sql}");
        }
        let src = "let a = '\"'; // \"status = 1\"\nquery(\"SET status = \\\n    4\")\n\
                   let b = br#\"{\"status\": 2}\"#; f::<'_>(\"x\")";
        assert_eq!(
            string_literals(src),
            ["SET status = 4", "{\"status\": 2}", "x"]
        );
    }

    /// Codes reach SQL text only through the constants above: no string literal of a SQL
    /// backend writes one as a number.
    #[test]
    fn no_sql_backend_writes_a_code_as_a_number() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
        let mut literals = 0;
        let mut found = Vec::new();
        for backend in ["sqlite", "postgres"] {
            let dir = root.join(backend);
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let src = std::fs::read_to_string(&path).unwrap();
                for literal in string_literals(&src) {
                    literals += 1;
                    for hit in literal_codes(&literal) {
                        found.push(format!("{}: {hit}", path.display()));
                    }
                }
            }
        }
        // The files were read: a wrong path must not pass for clean SQL.
        assert!(literals > 100, "only {literals} string literals read");
        assert!(
            found.is_empty(),
            "codes written as numbers:\n{}",
            found.join("\n")
        );
    }
}
