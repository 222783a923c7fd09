//! The `tracing` events a test sees: a subscriber that keeps every event of the crate,
//! with its level, message and fields as text.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One event as recorded: its level, its message, and its other fields as text (a
/// string as it is, anything else as its `Debug`).
#[derive(Debug, Clone)]
pub struct Seen {
    pub level: Level,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl Seen {
    /// The field `name`; panics, naming the event, when it has none.
    pub fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"))
    }
}

/// A subscriber that keeps every event of `tower_stream_backpressure`.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    /// The events recorded since the last call.
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// What `f` returns, and the events it emitted on this thread.
    pub fn recorded<T>(f: impl FnOnce() -> T) -> (T, Vec<Seen>) {
        let recorder = Recorder::default();
        let out = tracing::subscriber::with_default(recorder.clone(), f);
        (out, recorder.take())
    }
}

impl Visit for Seen {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            name => _ = self.fields.insert(name.to_owned(), text),
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            name => _ = self.fields.insert(name.to_owned(), value.to_owned()),
        }
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("tower_stream_backpressure")
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut seen = Seen {
            level: *event.metadata().level(),
            message: String::new(),
            fields: BTreeMap::new(),
        };
        event.record(&mut seen);
        self.0.lock().unwrap().push(seen);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}
