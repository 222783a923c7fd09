//! Errors that name the field in full: [`Config`]'s [`Deserialize`].
//!
//! The settings are read through [`serde_path_to_error`], which tracks where in the
//! input an error arose; the message then starts with that path, in the form of a
//! [`ConfigError`](crate::ConfigError): ``invalid `stream_retry.initial_delay`: ...``.
//! An error before any field (a syntax error at the start, a top level that is not a
//! map) keeps the format's own message.

use std::fmt::Write as _;

use serde::de::{Deserialize, Deserializer, Error as _};
use serde_path_to_error::{Path, Segment};

use super::Config;
use super::schema::ConfigFields;

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut track = serde_path_to_error::Track::new();
        let tracked = serde_path_to_error::Deserializer::new(deserializer, &mut track);
        ConfigFields::deserialize(tracked).map_err(|error| match name(&track.path()) {
            // The format's message ends with its position, if it gives one (serde_json
            // reads it back from there).
            Some(field) => D::Error::custom(format_args!("invalid `{field}`: {error}")),
            None => error,
        })
    }
}

/// The field `path` leads to, as a configuration names it: `stream_retry.budget.ttl`.
/// A key that is not a string (a syntax error where a key should be) ends it.
fn name(path: &Path) -> Option<String> {
    let mut name = String::new();
    for segment in path {
        match segment {
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(key);
            }
            Segment::Seq { index } => {
                let _ = write!(name, "[{index}]");
            }
            Segment::Unknown => break,
        }
    }
    (!name.is_empty()).then_some(name)
}
