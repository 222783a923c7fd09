//! How each field's value is read.
//!
//! Leniently, as configuration comes: a number or a boolean may be a string (as
//! environment variables give them), a duration is a string such as `"2s"`. A value of
//! the wrong kind says what the field expects and what it got; which field it is, the
//! path in [`path`](super::path) adds.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::Frames;

/// Reads a field's value as `T`.
pub(super) fn read<'de, D: Deserializer<'de>, T: Leaf>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_any(LeafVisitor(PhantomData))
}

/// Reads a field that is `None` when absent; when present, it must be a `T` (not null).
pub(super) fn some<'de, D: Deserializer<'de>, T: Leaf>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    read(deserializer).map(Some)
}

/// A field's value: what it takes of each kind a format may give. Each kind it does not
/// take fails with "expected ..., got ...".
pub(super) trait Leaf: Sized {
    /// What the field expects, as a message says it: "a number".
    fn expected() -> Cow<'static, str>;

    /// The message for a value it does not take.
    fn wrong(got: impl fmt::Display) -> String {
        format!("expected {}, got {got}", Self::expected())
    }

    fn from_bool(value: bool) -> Result<Self, String> {
        Err(Self::wrong(value))
    }

    fn from_int(value: i128) -> Result<Self, String> {
        Err(Self::wrong(value))
    }

    fn from_float(value: f64) -> Result<Self, String> {
        Err(Self::wrong(value))
    }

    fn from_str(value: &str) -> Result<Self, String> {
        Err(Self::wrong(format_args!("{value:?}")))
    }

    fn from_null() -> Result<Self, String> {
        Err(Self::wrong("null"))
    }
}

const DURATION: &str = "a duration such as \"250ms\", \"2s\" or \"1m\"";

impl Leaf for Duration {
    fn expected() -> Cow<'static, str> {
        DURATION.into()
    }

    fn from_str(value: &str) -> Result<Self, String> {
        humantime::parse_duration(value.trim())
            .map_err(|e| Self::wrong(format_args!("{value:?} ({e})")))
    }

    fn from_int(value: i128) -> Result<Self, String> {
        Err(Self::wrong(format_args!("{value}: a number needs a unit")))
    }

    fn from_float(value: f64) -> Result<Self, String> {
        Err(Self::wrong(format_args!("{value}: a number needs a unit")))
    }
}

macro_rules! whole_numbers {
    ($($ty:ty),*) => {$(
        impl Leaf for $ty {
            fn expected() -> Cow<'static, str> {
                format!("a whole number within 0 and {}", <$ty>::MAX).into()
            }

            fn from_int(value: i128) -> Result<Self, String> {
                Self::try_from(value).map_err(|_| Self::wrong(value))
            }

            fn from_str(value: &str) -> Result<Self, String> {
                match value.trim().parse::<i128>() {
                    Ok(n) => Self::from_int(n),
                    Err(_) => Err(Self::wrong(format_args!("{value:?}"))),
                }
            }
        }
    )*};
}

whole_numbers!(u32, usize);

impl Leaf for f64 {
    fn expected() -> Cow<'static, str> {
        "a number".into()
    }

    fn from_int(value: i128) -> Result<Self, String> {
        Ok(value as f64)
    }

    fn from_float(value: f64) -> Result<Self, String> {
        Ok(value)
    }

    fn from_str(value: &str) -> Result<Self, String> {
        value
            .trim()
            .parse()
            .map_err(|_| Self::wrong(format_args!("{value:?}")))
    }
}

impl Leaf for bool {
    fn expected() -> Cow<'static, str> {
        "true or false".into()
    }

    fn from_bool(value: bool) -> Result<Self, String> {
        Ok(value)
    }

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(Self::wrong(format_args!("{value:?}"))),
        }
    }
}

impl Leaf for Frames {
    fn expected() -> Cow<'static, str> {
        let names: Vec<_> = Frames::NAMES.iter().map(|(name, _)| *name).collect();
        format!("one of {}", names.join(", ")).into()
    }

    fn from_str(value: &str) -> Result<Self, String> {
        Frames::NAMES
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, frames)| *frames)
            .ok_or_else(|| Self::wrong(format_args!("{value:?}")))
    }
}

/// Null is `None`; anything else is read as `T`.
impl<T: Leaf> Leaf for Option<T> {
    fn expected() -> Cow<'static, str> {
        T::expected()
    }

    fn from_bool(value: bool) -> Result<Self, String> {
        T::from_bool(value).map(Some)
    }

    fn from_int(value: i128) -> Result<Self, String> {
        T::from_int(value).map(Some)
    }

    fn from_float(value: f64) -> Result<Self, String> {
        T::from_float(value).map(Some)
    }

    fn from_str(value: &str) -> Result<Self, String> {
        T::from_str(value).map(Some)
    }

    fn from_null() -> Result<Self, String> {
        Ok(None)
    }
}

/// Hands each kind of value to `T`; a list or a map is never a field's value.
struct LeafVisitor<T>(PhantomData<T>);

impl<'de, T: Leaf> Visitor<'de> for LeafVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&T::expected())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        T::from_bool(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        T::from_int(v.into()).map_err(E::custom)
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
        T::from_int(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::from_int(v.into()).map_err(E::custom)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
        match i128::try_from(v) {
            Ok(v) => T::from_int(v),
            Err(_) => Err(T::wrong(v)),
        }
        .map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        T::from_float(v).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        T::from_str(v).map_err(E::custom)
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<T, E> {
        Err(E::custom(T::wrong("bytes")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        T::from_null().map_err(E::custom)
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        T::from_null().map_err(E::custom)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::custom(T::wrong("a list")))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::custom(T::wrong("a map")))
    }
}

#[cfg(test)]
mod tests {
    use serde::de::value::{
        BoolDeserializer, Error, F64Deserializer, StrDeserializer, U128Deserializer,
        UnitDeserializer,
    };

    use super::*;

    fn message<T: Leaf + fmt::Debug>(result: Result<T, Error>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn each_kind_goes_to_the_field_or_says_what_came() {
        let unit = || UnitDeserializer::<Error>::new();
        assert_eq!(read::<_, Option<Duration>>(unit()).unwrap(), None);
        assert_eq!(
            message(read::<_, Duration>(unit())),
            "expected a duration such as \"250ms\", \"2s\" or \"1m\", got null"
        );
        let text = StrDeserializer::<Error>::new(" 1m 30s ");
        assert_eq!(read::<_, Duration>(text).unwrap(), Duration::from_secs(90));
        assert_eq!(
            message(read::<_, u32>(U128Deserializer::<Error>::new(u128::MAX))),
            format!(
                "expected a whole number within 0 and 4294967295, got {}",
                u128::MAX
            )
        );
        assert_eq!(
            message(read::<_, bool>(F64Deserializer::<Error>::new(1.0))),
            "expected true or false, got 1"
        );
        assert_eq!(
            message(read::<_, f64>(BoolDeserializer::<Error>::new(true))),
            "expected a number, got true"
        );
        assert_eq!(
            read::<_, Frames>(StrDeserializer::<Error>::new("json_array")).unwrap(),
            Frames::JsonArray
        );
        assert_eq!(
            some::<_, bool>(StrDeserializer::<Error>::new("false")).unwrap(),
            Some(false)
        );
    }
}
