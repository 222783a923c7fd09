//! Command-line values for the examples, checked to be in range.

use std::fmt::Display;
use std::str::FromStr;

/// The value of `flag`, parsed and checked to be within `min..=max`; errors name the
/// flag.
pub fn value<T>(parser: &mut lexopt::Parser, flag: &str, min: T, max: T) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display,
    T::Err: Display,
{
    let value = parser.value().map_err(|e| e.to_string())?;
    let text = value.to_string_lossy();
    match text.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        Ok(_) => Err(format!("{flag}: {text} is not within {min} and {max}")),
        Err(e) => Err(format!("{flag}: {text:?} is not a valid number ({e})")),
    }
}
