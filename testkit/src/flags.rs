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

/// The next flag as `--name` (`-h` as `--help`), `None` at the end, or an error for
/// anything else.
pub fn next_flag(parser: &mut lexopt::Parser) -> Result<Option<String>, String> {
    use lexopt::Arg::{Long, Short};
    let Some(arg) = parser.next().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    match arg {
        Long(name) => Ok(Some(format!("--{name}"))),
        Short('h') => Ok(Some("--help".to_owned())),
        _ => Err(arg.unexpected().to_string()),
    }
}
