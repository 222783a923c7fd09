//! Command-line values for the examples, checked to be in range.

use std::fmt::Display;
use std::path::PathBuf;
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

/// The flags every simulation benchmark takes beside its own, for a `flag` that is none
/// of its own: `--out-dir DIR` (into `out_dir`), `--help`, and `--bench` (which `cargo
/// bench` passes to every benchmark, ignored). `Ok(false)` for `--help`, `Ok(true)` to
/// go on, or an error for any other flag.
pub fn bench_flag(
    parser: &mut lexopt::Parser,
    flag: &str,
    out_dir: &mut PathBuf,
) -> Result<bool, String> {
    match flag {
        "--out-dir" => *out_dir = parser.value().map_err(|e| e.to_string())?.into(),
        "--help" => return Ok(false),
        "--bench" => {}
        _ => return Err(format!("invalid option '{flag}'")),
    }
    Ok(true)
}

/// The flags `parse` reads; or, after printing `help` for `--help` (exit status 0) or
/// what was wrong with the flags (status 2), the end of the program.
pub fn parse_or_exit<A>(
    program: &str,
    help: &str,
    parse: impl FnOnce() -> Result<Option<A>, String>,
) -> A {
    match parse() {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{help}");
            std::process::exit(0);
        }
        Err(message) => {
            eprintln!("{program}: {message}\nRun with --help to see the flags.");
            std::process::exit(2);
        }
    }
}
