//! Jepsen-style client histories of register operations: the JSONL event format, its
//! parser, and the paired [`Operation`]s the checkers consume.
//!
//! Format: one JSON object per line,
//! `{"process": int, "type": "invoke"|"ok"|"fail"|"info", "f": "read"|"write"|"cas",
//!   "key": string (optional; absent = the single register ""), "value": ...}`.
//! A write's value is the value written, a cas's value is `[expected, new]`, and an `ok`
//! read's value is what was read (`null` = absent). Values are arbitrary JSON, compared by
//! equality. Unknown extra fields (Jepsen's `time`, `index`, ...) are ignored; blank lines
//! are skipped. The value carried by a write or cas completion is ignored: the invoke's
//! arguments are authoritative.
//!
//! Invariants of a parsed [`History`]:
//! - Real time is line order: an event on line `a` happened before an event on line `b > a`.
//! - Each invoke is paired with the next completion of the same process; a process has at
//!   most one operation outstanding, and a completion's `f` and `key` equal its invoke's.
//!   Anything else is a [`HistoryError`] naming the line.
//! - `fail` operations certainly did not happen and are dropped. `info` operations, and
//!   invokes with no completion by the end of the history, are indeterminate: they may take
//!   effect at any time after their invoke, or never; their completion time is +infinity.
//!   An indeterminate read constrains nothing and is dropped. Every [`Operation`] kept
//!   therefore constrains the register.
//! - `History::operations` is in invoke order.
//!
//! This module does no I/O: it parses bytes handed to it and renders events as text.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

/// The kind of a history event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The client started the operation.
    Invoke,
    /// The operation certainly happened, with the given result.
    Ok,
    /// The operation certainly did not happen.
    Fail,
    /// The outcome is unknown (timeout, crash, lost reply).
    Info,
}

impl EventType {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "invoke" => Some(Self::Invoke),
            "ok" => Some(Self::Ok),
            "fail" => Some(Self::Fail),
            "info" => Some(Self::Info),
            _ => None,
        }
    }
}

/// The register function an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// Read the register.
    Read,
    /// Overwrite the register.
    Write,
    /// Compare-and-set: `[expected, new]`.
    Cas,
}

impl Function {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "cas" => Some(Self::Cas),
            _ => None,
        }
    }

    /// The name used in the JSONL format.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Cas => "cas",
        }
    }
}

/// One line of a history, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The client process; a process has at most one operation outstanding.
    pub process: i64,
    /// Invoke or one of the three completions.
    pub event_type: EventType,
    /// The register function.
    pub f: Function,
    /// The register's key; `None` is the single register `""`.
    pub key: Option<String>,
    /// The argument (invoke) or result (ok read); `None` means the field is absent, which is
    /// different from `Some(Value::Null)` (`null`, the absent register).
    pub value: Option<Value>,
}

impl Event {
    /// The event as one JSONL line, without the trailing newline.
    pub fn to_json_line(&self) -> String {
        let mut object = Map::new();
        object.insert("process".to_owned(), Value::from(self.process));
        let type_name = match self.event_type {
            EventType::Invoke => "invoke",
            EventType::Ok => "ok",
            EventType::Fail => "fail",
            EventType::Info => "info",
        };
        object.insert("type".to_owned(), Value::from(type_name));
        object.insert("f".to_owned(), Value::from(self.f.name()));
        if let Some(key) = &self.key {
            object.insert("key".to_owned(), Value::from(key.as_str()));
        }
        if let Some(value) = &self.value {
            object.insert("value".to_owned(), value.clone());
        }
        Value::Object(object).to_string()
    }

    /// Parses one JSONL line; `line` (1-based) only labels errors.
    pub fn parse_line(text: &str, line: usize) -> Result<Self, HistoryError> {
        let parsed: Value = serde_json::from_str(text)
            .map_err(|source| HistoryError::InvalidJson { line, message: json_error_message(&source) })?;
        let Value::Object(mut object) = parsed else {
            return Err(HistoryError::NotAnObject { line, found: json_type_name(&parsed) });
        };
        let process = match object.get("process") {
            None => return Err(HistoryError::MissingField { line, field: "process" }),
            Some(value) => value.as_i64().ok_or_else(|| HistoryError::InvalidField {
                line,
                field: "process",
                expected: "an integer",
                found: abbreviate(value),
            })?,
        };
        let event_type = match object.get("type") {
            None => return Err(HistoryError::MissingField { line, field: "type" }),
            Some(value) => value.as_str().and_then(EventType::parse).ok_or_else(|| HistoryError::InvalidField {
                line,
                field: "type",
                expected: "one of \"invoke\", \"ok\", \"fail\", \"info\"",
                found: abbreviate(value),
            })?,
        };
        let f = match object.get("f") {
            None => return Err(HistoryError::MissingField { line, field: "f" }),
            Some(value) => value.as_str().and_then(Function::parse).ok_or_else(|| HistoryError::InvalidField {
                line,
                field: "f",
                expected: "one of \"read\", \"write\", \"cas\"",
                found: abbreviate(value),
            })?,
        };
        let key = match object.get("key") {
            None => None,
            Some(Value::String(key)) => Some(key.clone()),
            Some(value) => {
                return Err(HistoryError::InvalidField {
                    line,
                    field: "key",
                    expected: "a string",
                    found: abbreviate(value),
                })
            }
        };
        let value = object.remove("value");
        Ok(Self { process, event_type, f, key, value })
    }
}

/// What an operation did to the register, with its arguments and (for reads) its result.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A read that returned `observed` (`null` = absent).
    Read {
        /// The value the read returned.
        observed: Value,
    },
    /// A write of `value`.
    Write {
        /// The value written.
        value: Value,
    },
    /// A compare-and-set. An `ok` cas succeeded; an indeterminate one may have either
    /// succeeded or found another value.
    Cas {
        /// The value the register must hold for the cas to apply.
        expected: Value,
        /// The value written if it applies.
        new: Value,
    },
}

/// How an operation completed, among those that may have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The operation certainly happened; its `ok` event is on this line.
    Ok {
        /// 1-based line of the `ok` event.
        line: usize,
    },
    /// The outcome is unknown: completion time +infinity.
    Indeterminate {
        /// 1-based line of the `info` event, or `None` if the history ended first.
        info_line: Option<usize>,
    },
}

/// An invoke paired with its completion; `fail`ed operations and indeterminate reads are not
/// represented.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    /// The client process.
    pub process: i64,
    /// The register's key (`""` when the events had none).
    pub key: String,
    /// What the operation did.
    pub action: Action,
    /// 1-based line of the invoke event; also its real-time position.
    pub invoke_line: usize,
    /// The completion.
    pub completion: Completion,
}

impl Operation {
    /// Real-time position of the completion; `None` is +infinity (indeterminate).
    pub fn complete_line(&self) -> Option<usize> {
        match self.completion {
            Completion::Ok { line } => Some(line),
            Completion::Indeterminate { .. } => None,
        }
    }

    /// Whether the operation certainly happened.
    pub fn is_definite(&self) -> bool {
        matches!(self.completion, Completion::Ok { .. })
    }
}

impl fmt::Display for Operation {
    /// For example `process 2 read -> 1 (lines 5-9)` or `process 0 write 3 (line 4, info)`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "process {} ", self.process)?;
        match &self.action {
            Action::Read { observed } => write!(formatter, "read -> {}", abbreviate(observed))?,
            Action::Write { value } => write!(formatter, "write {}", abbreviate(value))?,
            Action::Cas { expected, new } => write!(formatter, "cas {} -> {}", abbreviate(expected), abbreviate(new))?,
        }
        match self.completion {
            Completion::Ok { line } => write!(formatter, " (lines {}-{line})", self.invoke_line),
            Completion::Indeterminate { info_line: Some(line) } => {
                write!(formatter, " (invoked line {}, info line {line})", self.invoke_line)
            }
            Completion::Indeterminate { info_line: None } => {
                write!(formatter, " (invoked line {}, never completed)", self.invoke_line)
            }
        }
    }
}

/// Counts of what the parser saw and dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Non-blank lines parsed.
    pub events: usize,
    /// Operations kept whose completion was `ok`.
    pub definite: usize,
    /// Operations kept whose completion was `info` or missing.
    pub indeterminate: usize,
    /// Operations dropped because they completed with `fail`.
    pub failed_dropped: usize,
    /// Reads dropped because their outcome was unknown.
    pub indeterminate_reads_dropped: usize,
}

/// A parsed history: paired operations in invoke order. See the module invariants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    operations: Vec<Operation>,
    stats: HistoryStats,
}

/// Why a history could not be parsed. Every variant names the 1-based line at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The line is not UTF-8.
    #[error("line {line}: not valid UTF-8")]
    InvalidUtf8 {
        /// 1-based line.
        line: usize,
    },
    /// The line is not JSON.
    #[error("line {line}: invalid JSON: {message}")]
    InvalidJson {
        /// 1-based line.
        line: usize,
        /// serde_json's description.
        message: String,
    },
    /// The line is JSON but not an object.
    #[error("line {line}: expected a JSON object, found {found}")]
    NotAnObject {
        /// 1-based line.
        line: usize,
        /// The JSON type found.
        found: &'static str,
    },
    /// A required field is absent.
    #[error("line {line}: missing field `{field}`")]
    MissingField {
        /// 1-based line.
        line: usize,
        /// The field's name.
        field: &'static str,
    },
    /// A field has the wrong type or an unknown value.
    #[error("line {line}: field `{field}` must be {expected}, found {found}")]
    InvalidField {
        /// 1-based line.
        line: usize,
        /// The field's name.
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// What it was (abbreviated).
        found: String,
    },
    /// A process invoked while its previous operation was still outstanding.
    #[error(
        "line {line}: process {process} invokes while its operation invoked on line \
         {outstanding_line} is still outstanding"
    )]
    OverlappingInvoke {
        /// 1-based line of the second invoke.
        line: usize,
        /// The process.
        process: i64,
        /// 1-based line of the outstanding invoke.
        outstanding_line: usize,
    },
    /// A completion with no outstanding invoke of its process.
    #[error("line {line}: process {process} completes an operation it never invoked")]
    CompletionWithoutInvoke {
        /// 1-based line of the completion.
        line: usize,
        /// The process.
        process: i64,
    },
    /// Events handed to [`History::from_events`] out of order.
    #[error("line {line}: positions must increase, but the previous event was at {previous_line}")]
    PositionNotIncreasing {
        /// The offending position.
        line: usize,
        /// The position before it.
        previous_line: usize,
    },
    /// A completion whose `f` or `key` differs from its invoke's.
    #[error(
        "line {line}: completion's `{field}` is {found} but its invoke on line {invoke_line} \
         has {expected}"
    )]
    MismatchedCompletion {
        /// 1-based line of the completion.
        line: usize,
        /// 1-based line of the invoke.
        invoke_line: usize,
        /// `f` or `key`.
        field: &'static str,
        /// The invoke's value of that field.
        expected: String,
        /// The completion's value of that field.
        found: String,
    },
}

impl HistoryError {
    /// The 1-based line the error is about.
    pub fn line(&self) -> usize {
        match self {
            Self::InvalidUtf8 { line }
            | Self::InvalidJson { line, .. }
            | Self::NotAnObject { line, .. }
            | Self::MissingField { line, .. }
            | Self::InvalidField { line, .. }
            | Self::OverlappingInvoke { line, .. }
            | Self::CompletionWithoutInvoke { line, .. }
            | Self::PositionNotIncreasing { line, .. }
            | Self::MismatchedCompletion { line, .. } => *line,
        }
    }
}

/// How a completion ended its operation.
enum Ending {
    Ok,
    Fail,
    Info,
}

/// An invoke waiting for its completion.
struct Outstanding {
    line: usize,
    f: Function,
    key: Option<String>,
    /// The invoke's arguments, already validated; `None` for reads.
    arguments: Option<Action>,
}

impl History {
    /// Parses a JSONL history. Lines are split on `\n` (a trailing `\r` is ignored, as is a
    /// blank line); each must be UTF-8.
    pub fn parse_jsonl(bytes: &[u8]) -> Result<Self, HistoryError> {
        let mut events = Vec::new();
        for (index, raw_line) in bytes.split(|byte| *byte == b'\n').enumerate() {
            let line = index + 1;
            let text = std::str::from_utf8(raw_line).map_err(|_| HistoryError::InvalidUtf8 { line })?;
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            events.push((line, Event::parse_line(text, line)?));
        }
        Self::from_events(events)
    }

    /// Builds a history from events labelled with positions (line numbers, from 1), which
    /// are the real-time order and must strictly increase.
    pub fn from_events(events: impl IntoIterator<Item = (usize, Event)>) -> Result<Self, HistoryError> {
        let mut history = Self::default();
        // BTreeMap, not HashMap: nothing here may depend on a random hasher seed.
        let mut outstanding: BTreeMap<i64, Outstanding> = BTreeMap::new();
        let mut previous_line = 0usize;
        for (line, event) in events {
            if line <= previous_line {
                return Err(HistoryError::PositionNotIncreasing { line, previous_line });
            }
            previous_line = line;
            history.stats.events += 1;
            match event.event_type {
                EventType::Invoke => {
                    if let Some(previous) = outstanding.get(&event.process) {
                        return Err(HistoryError::OverlappingInvoke {
                            line,
                            process: event.process,
                            outstanding_line: previous.line,
                        });
                    }
                    let arguments = invoke_arguments(&event, line)?;
                    outstanding.insert(event.process, Outstanding { line, f: event.f, key: event.key, arguments });
                }
                EventType::Ok | EventType::Fail | EventType::Info => {
                    let ending = match event.event_type {
                        EventType::Fail => Ending::Fail,
                        EventType::Info => Ending::Info,
                        _ => Ending::Ok,
                    };
                    let Some(invoke) = outstanding.remove(&event.process) else {
                        return Err(HistoryError::CompletionWithoutInvoke { line, process: event.process });
                    };
                    history.complete(invoke, ending, event, line)?;
                }
            }
        }
        // Invokes never completed are indeterminate; add them in invoke order.
        let mut unfinished: Vec<(i64, Outstanding)> = outstanding.into_iter().collect();
        unfinished.sort_by_key(|(_, invoke)| invoke.line);
        for (process, invoke) in unfinished {
            history.push_indeterminate(process, invoke, None);
        }
        history.operations.sort_by_key(|operation| operation.invoke_line);
        Ok(history)
    }

    fn complete(&mut self, invoke: Outstanding, ending: Ending, event: Event, line: usize) -> Result<(), HistoryError> {
        if event.f != invoke.f {
            return Err(HistoryError::MismatchedCompletion {
                line,
                invoke_line: invoke.line,
                field: "f",
                expected: format!("{:?}", invoke.f.name()),
                found: format!("{:?}", event.f.name()),
            });
        }
        if event.key != invoke.key {
            let show = |key: &Option<String>| match key {
                Some(key) => format!("{key:?}"),
                None => "no key".to_owned(),
            };
            return Err(HistoryError::MismatchedCompletion {
                line,
                invoke_line: invoke.line,
                field: "key",
                expected: show(&invoke.key),
                found: show(&event.key),
            });
        }
        match ending {
            Ending::Fail => self.stats.failed_dropped += 1,
            Ending::Info => self.push_indeterminate(event.process, invoke, Some(line)),
            Ending::Ok => {
                let action = match invoke.arguments {
                    Some(action) => action,
                    None => match event.value {
                        Some(observed) => Action::Read { observed },
                        None => return Err(HistoryError::MissingField { line, field: "value" }),
                    },
                };
                self.operations.push(Operation {
                    process: event.process,
                    key: invoke.key.unwrap_or_default(),
                    action,
                    invoke_line: invoke.line,
                    completion: Completion::Ok { line },
                });
                self.stats.definite += 1;
            }
        }
        Ok(())
    }

    fn push_indeterminate(&mut self, process: i64, invoke: Outstanding, info_line: Option<usize>) {
        match invoke.arguments {
            // An indeterminate read constrains nothing.
            None => self.stats.indeterminate_reads_dropped += 1,
            Some(action) => {
                self.operations.push(Operation {
                    process,
                    key: invoke.key.unwrap_or_default(),
                    action,
                    invoke_line: invoke.line,
                    completion: Completion::Indeterminate { info_line },
                });
                self.stats.indeterminate += 1;
            }
        }
    }

    /// The operations, in invoke order.
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    /// What the parser saw and dropped.
    pub fn stats(&self) -> HistoryStats {
        self.stats
    }

    /// Indices into [`History::operations`] grouped by key, keys in sorted order, each
    /// group in invoke order.
    pub fn indices_by_key(&self) -> BTreeMap<&str, Vec<usize>> {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (index, operation) in self.operations.iter().enumerate() {
            groups.entry(operation.key.as_str()).or_default().push(index);
        }
        groups
    }
}

/// Validates an invoke's `value` for its function; `None` for reads (their value is ignored).
fn invoke_arguments(event: &Event, line: usize) -> Result<Option<Action>, HistoryError> {
    match event.f {
        Function::Read => Ok(None),
        Function::Write => match &event.value {
            Some(value) => Ok(Some(Action::Write { value: value.clone() })),
            None => Err(HistoryError::MissingField { line, field: "value" }),
        },
        Function::Cas => {
            let Some(value) = &event.value else {
                return Err(HistoryError::MissingField { line, field: "value" });
            };
            if let Some([expected, new]) = value.as_array().map(Vec::as_slice) {
                return Ok(Some(Action::Cas { expected: expected.clone(), new: new.clone() }));
            }
            Err(HistoryError::InvalidField {
                line,
                field: "value",
                expected: "a cas pair [expected, new]",
                found: abbreviate(value),
            })
        }
    }
}

/// serde_json's message with its position given as a column of the line (serde_json counts
/// lines within the one-line text it was handed, which would always say "line 1").
fn json_error_message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let message = match text.rsplit_once(" at line ") {
        Some((message, _)) => message,
        None => text.as_str(),
    };
    format!("{message} at column {}", error.column())
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Longest rendering of a value in messages before it is cut.
const VALUE_DISPLAY_CHARS_MAX: usize = 80;

/// Compact JSON of `value`, cut to [`VALUE_DISPLAY_CHARS_MAX`] characters.
pub fn abbreviate(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= VALUE_DISPLAY_CHARS_MAX {
        return text;
    }
    let mut cut: String = text.chars().take(VALUE_DISPLAY_CHARS_MAX).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    //! Parser tests: pairing, dropping, and errors naming the right line.

    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<History, HistoryError> {
        History::parse_jsonl(text.as_bytes())
    }

    #[test]
    fn pairs_invokes_with_completions_and_drops_failures() {
        let history = parse(concat!(
            r#"{"process": 0, "type": "invoke", "f": "write", "key": "a", "value": 1}"#,
            "\n",
            r#"{"process": 1, "type": "invoke", "f": "read", "key": "a", "value": null}"#,
            "\n\n",
            r#"{"process": 0, "type": "ok", "f": "write", "key": "a", "value": 1}"#,
            "\n",
            r#"{"process": 1, "type": "ok", "f": "read", "key": "a", "value": 1}"#,
            "\n",
            r#"{"process": 0, "type": "invoke", "f": "cas", "key": "a", "value": [1, 2]}"#,
            "\n",
            r#"{"process": 0, "type": "fail", "f": "cas", "key": "a", "value": [1, 2]}"#,
            "\n",
        ))
        .expect("valid history");
        let operations = history.operations();
        assert_eq!(operations.len(), 2);
        assert_eq!(
            operations[0],
            Operation {
                process: 0,
                key: "a".to_owned(),
                action: Action::Write { value: json!(1) },
                invoke_line: 1,
                completion: Completion::Ok { line: 4 },
            }
        );
        assert_eq!(operations[1].action, Action::Read { observed: json!(1) });
        assert_eq!(operations[1].complete_line(), Some(5));
        let stats = history.stats();
        assert_eq!(stats.events, 6);
        assert_eq!(stats.failed_dropped, 1);
        assert_eq!(stats.definite, 2);
    }

    #[test]
    fn info_and_unfinished_are_indeterminate_and_reads_among_them_dropped() {
        let history = parse(concat!(
            r#"{"process": 0, "type": "invoke", "f": "write", "value": 1}"#,
            "\n",
            r#"{"process": 1, "type": "invoke", "f": "read"}"#,
            "\n",
            r#"{"process": 0, "type": "info", "f": "write", "value": 1}"#,
            "\n",
            r#"{"process": 0, "type": "invoke", "f": "cas", "value": [1, 2]}"#,
            "\n",
            r#"{"process": 2, "type": "invoke", "f": "read"}"#,
        ))
        .expect("valid history");
        let operations = history.operations();
        assert_eq!(operations.len(), 2);
        assert_eq!(operations[0].key, "");
        assert_eq!(operations[0].completion, Completion::Indeterminate { info_line: Some(3) });
        assert_eq!(operations[1].completion, Completion::Indeterminate { info_line: None });
        assert_eq!(history.stats().indeterminate_reads_dropped, 2);
        assert_eq!(history.stats().indeterminate, 2);
    }

    #[test]
    fn an_info_completion_frees_the_process_for_its_next_invoke() {
        let history = parse(concat!(
            r#"{"process": 0, "type": "invoke", "f": "write", "value": 1}"#,
            "\n",
            r#"{"process": 0, "type": "info", "f": "write", "value": 1}"#,
            "\n",
            r#"{"process": 0, "type": "invoke", "f": "write", "value": 2}"#,
            "\n",
            r#"{"process": 0, "type": "ok", "f": "write", "value": 2}"#,
        ))
        .expect("valid history");
        assert_eq!(history.operations().len(), 2);
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("{\"process\": 0, \"type\": \"invoke\", \"f\": \"read\"}\nnot json", 2, "invalid JSON"),
            ("[1, 2]", 1, "expected a JSON object"),
            (r#"{"type": "invoke", "f": "read"}"#, 1, "missing field `process`"),
            (r#"{"process": "n", "type": "invoke", "f": "read"}"#, 1, "field `process`"),
            (r#"{"process": 1.5, "type": "invoke", "f": "read"}"#, 1, "field `process`"),
            (r#"{"process": 0, "type": "begin", "f": "read"}"#, 1, "field `type`"),
            (r#"{"process": 0, "type": "invoke", "f": "append"}"#, 1, "field `f`"),
            (r#"{"process": 0, "type": "invoke", "f": "read", "key": 3}"#, 1, "field `key`"),
            (r#"{"process": 0, "type": "invoke", "f": "write"}"#, 1, "missing field `value`"),
            (r#"{"process": 0, "type": "invoke", "f": "cas", "value": [1]}"#, 1, "cas pair"),
            (r#"{"process": 0, "type": "ok", "f": "read", "value": 1}"#, 1, "never invoked"),
            (
                "{\"process\": 0, \"type\": \"invoke\", \"f\": \"read\"}\n\n{\"process\": 0, \"type\": \"invoke\", \"f\": \"read\"}",
                3,
                "still outstanding",
            ),
            (
                "{\"process\": 0, \"type\": \"invoke\", \"f\": \"read\"}\n{\"process\": 0, \"type\": \"ok\", \"f\": \"write\", \"value\": 1}",
                2,
                "`f`",
            ),
            (
                "{\"process\": 0, \"type\": \"invoke\", \"f\": \"read\", \"key\": \"a\"}\n{\"process\": 0, \"type\": \"ok\", \"f\": \"read\", \"key\": \"b\", \"value\": 1}",
                2,
                "`key`",
            ),
            (
                "{\"process\": 0, \"type\": \"invoke\", \"f\": \"read\"}\n{\"process\": 0, \"type\": \"ok\", \"f\": \"read\"}",
                2,
                "missing field `value`",
            ),
        ];
        for (text, line, fragment) in cases {
            let error = parse(text).expect_err(text);
            assert_eq!(error.line(), *line, "{text}: {error}");
            let message = error.to_string();
            assert!(message.starts_with(&format!("line {line}: ")), "{message}");
            assert!(message.contains(fragment), "{message} lacks {fragment}");
        }
    }

    #[test]
    fn from_events_rejects_positions_out_of_order() {
        let read = |event_type| Event { process: 0, event_type, f: Function::Read, key: None, value: Some(json!(1)) };
        let error = History::from_events([(2, read(EventType::Invoke)), (2, read(EventType::Ok))])
            .expect_err("positions must increase");
        assert_eq!(error, HistoryError::PositionNotIncreasing { line: 2, previous_line: 2 });
        assert!(History::from_events([(0, read(EventType::Invoke))]).is_err(), "positions start at 1");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let error = History::parse_jsonl(b"\n\xff\xfe\n").expect_err("not UTF-8");
        assert_eq!(error, HistoryError::InvalidUtf8 { line: 2 });
    }

    #[test]
    fn events_round_trip_through_json_lines() {
        let events = [
            Event {
                process: 3,
                event_type: EventType::Invoke,
                f: Function::Cas,
                key: Some("k".to_owned()),
                value: Some(json!([null, {"a": [1, 2]}])),
            },
            Event { process: 3, event_type: EventType::Ok, f: Function::Read, key: None, value: Some(Value::Null) },
            Event { process: -1, event_type: EventType::Info, f: Function::Write, key: None, value: None },
        ];
        for event in events {
            let line = event.to_json_line();
            assert_eq!(Event::parse_line(&line, 1), Ok(event), "{line}");
        }
    }

    #[test]
    fn operations_display_their_lines() {
        let history = parse(concat!(
            r#"{"process": 2, "type": "invoke", "f": "read"}"#,
            "\n",
            r#"{"process": 2, "type": "ok", "f": "read", "value": "x"}"#,
            "\n",
            r#"{"process": 0, "type": "invoke", "f": "cas", "value": [null, 1]}"#,
        ))
        .expect("valid history");
        let shown: Vec<String> = history.operations().iter().map(|op| op.to_string()).collect();
        assert_eq!(
            shown,
            ["process 2 read -> \"x\" (lines 1-2)", "process 0 cas null -> 1 (invoked line 3, never completed)"]
        );
    }
}
