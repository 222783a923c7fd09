//! How each field's value is read.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::Frames;

// Deserialization. Each field reads a plain value and converts it itself, so that an
// error names the field in full (`stream_retry.initial_delay`), which serde's own
// messages for a value of the wrong kind do not.

/// A value as a configuration format gives it.
enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    /// A list or a map: never a valid leaf.
    Other(&'static str),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Other(what) => f.write_str(what),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = Value;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, a string, a boolean or null")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v.into()))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
                Ok(Value::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
                Ok(Value::Int(v.into()))
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
                Ok(i128::try_from(v).map_or(Value::Float(v as f64), Value::Int))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Str(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
                Ok(Value::Str(v))
            }

            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
                Ok(Value::Other("bytes"))
            }

            fn visit_none<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }

            fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
                Value::deserialize(deserializer)
            }

            fn visit_newtype_struct<D: Deserializer<'de>>(
                self,
                deserializer: D,
            ) -> Result<Value, D::Error> {
                Value::deserialize(deserializer)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Value::Other("a list"))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Value::Other("a map"))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

const DURATION: &str = "a duration such as \"250ms\", \"2s\" or \"1m\"";

fn duration(value: Value) -> Result<Duration, String> {
    match value {
        Value::Str(s) => humantime_serde::re::humantime::parse_duration(s.trim())
            .map_err(|e| format!("expected {DURATION}, got {s:?} ({e})")),
        Value::Int(_) | Value::Float(_) => Err(format!(
            "expected {DURATION}, got {value}: a number needs a unit"
        )),
        other => Err(format!("expected {DURATION}, got {other}")),
    }
}

fn optional_duration(value: Value) -> Result<Option<Duration>, String> {
    match value {
        Value::Null => Ok(None),
        value => duration(value).map(Some),
    }
}

fn whole<T: TryFrom<i128> + Bounded>(value: Value) -> Result<T, String> {
    let expected = || format!("expected a whole number within 0 and {}", T::MAX);
    let n = match value {
        Value::Int(n) => n,
        Value::Str(ref s) => s
            .trim()
            .parse::<i128>()
            .map_err(|_| format!("{}, got {value}", expected()))?,
        other => return Err(format!("{}, got {other}", expected())),
    };
    T::try_from(n).map_err(|_| format!("{}, got {n}", expected()))
}

/// The largest value of an unsigned integer type, for messages.
trait Bounded {
    const MAX: u128;
}

impl Bounded for u32 {
    const MAX: u128 = u32::MAX as u128;
}

impl Bounded for usize {
    const MAX: u128 = usize::MAX as u128;
}

fn number(value: Value) -> Result<f64, String> {
    match value {
        Value::Int(n) => Ok(n as f64),
        Value::Float(x) => Ok(x),
        Value::Str(ref s) => s
            .trim()
            .parse()
            .map_err(|_| format!("expected a number, got {value}")),
        other => Err(format!("expected a number, got {other}")),
    }
}

fn boolean(value: Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(b),
        Value::Str(s) if s == "true" => Ok(true),
        Value::Str(s) if s == "false" => Ok(false),
        other => Err(format!("expected true or false, got {other}")),
    }
}

fn frames(value: Value) -> Result<Frames, String> {
    let names = || {
        Frames::NAMES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match value {
        Value::Str(s) => Frames::NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, frames)| *frames)
            .ok_or_else(|| format!("expected one of {}, got {s:?}", names())),
        other => Err(format!("expected one of {}, got {other}", names())),
    }
}

/// Reads the value of `field` with `convert`; an error names the field.
fn field<'de, D, T>(
    deserializer: D,
    field: &str,
    convert: fn(Value) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let value = Value::deserialize(deserializer)
        .map_err(|e| de::Error::custom(format_args!("invalid `{field}`: {e}")))?;
    convert(value)
        .map_err(|problem| de::Error::custom(format_args!("invalid `{field}`: {problem}")))
}

macro_rules! fields {
    ($($name:ident: $ty:ty = $convert:expr, $path:literal;)*) => {$(
        pub(super) fn $name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<$ty, D::Error> {
            field(deserializer, $path, $convert)
        }
    )*};
}

fields! {
    de_stream_max_concurrent: usize = whole, "stream_max_concurrent";
    de_max_wait: Option<Duration> = optional_duration, "max_wait";
    de_max_queued: Option<usize> = |v| match v {
        Value::Null => Ok(None),
        v => whole(v).map(Some),
    }, "max_queued";
    de_first_chunk_timeout: Duration = duration, "first_chunk_timeout";
    de_stream_idle_timeout: Duration = duration, "stream_idle_timeout";
    de_frames: Frames = frames, "frames";
    de_retry_enabled: bool = boolean, "stream_retry.enabled";
    de_max_attempts: u32 = whole, "stream_retry.max_attempts";
    de_initial_delay: Duration = duration, "stream_retry.initial_delay";
    de_max_delay: Duration = duration, "stream_retry.max_delay";
    de_retry_maybe_processed: bool = boolean, "stream_retry.retry_maybe_processed";
    de_budget_enabled: Option<bool> = |v| boolean(v).map(Some), "stream_retry.budget.enabled";
    de_ttl: Option<Duration> = |v| duration(v).map(Some), "stream_retry.budget.ttl";
    de_min_per_sec: Option<u32> = |v| whole(v).map(Some), "stream_retry.budget.min_per_sec";
    de_retry_ratio: Option<f64> = |v| number(v).map(Some), "stream_retry.budget.retry_ratio";
    de_rate_per_sec: Option<u32> = |v| whole(v).map(Some), "stream_retry.budget.rate_per_sec";
    de_burst: Option<u32> = |v| whole(v).map(Some), "stream_retry.budget.burst";
}
