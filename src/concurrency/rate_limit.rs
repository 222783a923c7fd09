//! Rate-limit pacing: when a provider's response says new calls may go out again.
//!
//! # Parsing by hand
//!
//! OpenAI writes its resets as Go durations (`6m0s`), Anthropic as RFC 3339 times.
//! `humantime`, already a dependency of the `serde` feature and free of dependencies
//! of its own, was the candidate, and does not fit:
//!
//! - `parse_duration` (fractions since 2.3) reads `6m0s`, `0.5s` and `1h2m3.5s`, but it
//!   is made for people's input: it takes spaces, days, weeks and years, and `M` for
//!   months, so a garbled `6M0s` reads as six months where Go's grammar refuses it; it
//!   refuses Greek `μs`, which Go accepts, and a fraction finer than a nanosecond.
//! - `parse_rfc3339` takes no offset but `Z` and `+00:00`, and `parse_rfc3339_weak`
//!   reads a time without a zone as UTC and drops an offset after fractional seconds
//!   (`10:00:30.5+02:00` reads as `10:00:30.5Z`, two hours off, without an error).
//!
//! A header is machine-written: its parser should take what the grammar allows and
//! refuse the rest, so that a garbled value is reported rather than read as something
//! else. Both grammars are small, and the two strict parsers here take fewer lines
//! than the notes it would take to fence the lax ones.

// Not wired into the concurrency layer yet: only the tests use these for now.
#![cfg_attr(not(test), allow(dead_code))]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A Go duration, as `time.Duration` prints it and OpenAI sends its resets: `1s`,
/// `6m0s`, `20ms`, `1h2m3.5s`, `0.5s`.
///
/// Go's grammar (`time.ParseDuration`) without a sign, since a wait is never negative:
/// one or more decimal numbers (digits before or after the point, or both), each with
/// a unit, `ns`, `us`, `µs` (micro sign), `μs` (Greek mu), `ms`, `s`, `m` or `h`; or a
/// bare `0`. No spaces, no other units. Digits below the nanosecond are dropped, as Go
/// drops them; a value too large for a `Duration` saturates. `None` when it is not in
/// that grammar.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.as_bytes();
    if rest.is_empty() {
        return None;
    }
    // Nanoseconds, saturating: far above any wait we believe, and no overflow.
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (whole, tail) = split_digits(rest);
        let (fraction, tail) = match tail.split_first() {
            Some((b'.', after)) => split_digits(after),
            _ => (&[][..], tail),
        };
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = tail
            .iter()
            .take_while(|&&b| b != b'.' && !b.is_ascii_digit())
            .count();
        let (unit, tail) = tail.split_at(unit_len);
        let unit: u128 = match unit {
            b"ns" => 1,
            b"us" | b"\xC2\xB5s" | b"\xCE\xBCs" => 1_000,
            b"ms" => 1_000_000,
            b"s" => NANOS_PER_SEC,
            b"m" => 60 * NANOS_PER_SEC,
            b"h" => 3600 * NANOS_PER_SEC,
            _ => return None,
        };
        let whole = whole.iter().fold(0u128, |n, &d| {
            n.saturating_mul(10).saturating_add(u128::from(d - b'0'))
        });
        // Eighteen digits are finer than a nanosecond of any unit, and fit: below
        // 10^18 times an hour's 3.6 * 10^12 ns.
        let (numerator, denominator) = fraction
            .iter()
            .take(18)
            .fold((0u128, 1u128), |(n, scale), &d| {
                (n * 10 + u128::from(d - b'0'), scale * 10)
            });
        total = total
            .saturating_add(whole.saturating_mul(unit))
            .saturating_add(numerator * unit / denominator);
        rest = tail;
    }
    Some(match u64::try_from(total / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(secs, (total % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    })
}

/// The leading ASCII digits of `bytes`, and what follows them.
fn split_digits(bytes: &[u8]) -> (&[u8], &[u8]) {
    bytes.split_at(bytes.iter().take_while(|b| b.is_ascii_digit()).count())
}

/// An RFC 3339 date-time (section 5.6), as Anthropic sends its resets:
/// `2026-12-02T10:00:30Z`, with fractional seconds (`10:00:30.25Z`) or an offset
/// (`10:00:30+02:00`, `-00:00`).
///
/// Strict: four-digit year, every field two digits and in range (the day in its month,
/// a leap second `:60` read as the second after `:59`), `T` and `Z` in either case as
/// the grammar allows, never a space for the `T` or a missing zone. Digits below the
/// nanosecond are dropped. `None` when it is not in that grammar.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let at = |i: usize, c: u8| b.get(i).is_some_and(|x| x.eq_ignore_ascii_case(&c));
    if !(at(4, b'-') && at(7, b'-') && at(10, b'T') && at(13, b':') && at(16, b':')) {
        return None;
    }
    let field = |from: usize, to: usize| number(b.get(from..to)?);
    let (year, month, day) = (field(0, 4)?, field(5, 7)?, field(8, 10)?);
    let (hour, minute, second) = (field(11, 13)?, field(14, 16)?, field(17, 19)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }

    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let Some((b'.', after)) = rest.split_first() {
        let (digits, after) = split_digits(after);
        if digits.is_empty() {
            return None;
        }
        nanos = (0..9).fold(0, |n, i| {
            n * 10 + digits.get(i).map_or(0, |d| u32::from(d - b'0'))
        });
        rest = after;
    }
    let offset = match rest {
        [z] if z.eq_ignore_ascii_case(&b'Z') => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (hours, minutes) = (number(&[*h1, *h2])?, number(&[*m1, *m2])?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = i64::from(hours * 3600 + minutes * 60);
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };

    let local =
        days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    let utc = local - offset;
    let from_epoch = Duration::from_secs(utc.unsigned_abs());
    let whole = if utc >= 0 {
        UNIX_EPOCH.checked_add(from_epoch)?
    } else {
        UNIX_EPOCH.checked_sub(from_epoch)?
    };
    whole.checked_add(Duration::from_nanos(u64::from(nanos)))
}

/// All of `digits` as a number: `None` if empty or not all ASCII digits. At most four
/// digits here, so no overflow.
fn number(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`), for years 0 to 9999.
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(ms: u64) -> Option<Duration> {
        Some(Duration::from_millis(ms))
    }

    #[test]
    fn go_durations_as_openai_writes_them() {
        for (text, want) in [
            ("1s", ms(1000)),
            ("6m0s", ms(360_000)),
            ("20ms", ms(20)),
            ("1h2m3.5s", ms(3_723_500)),
            ("0.5s", ms(500)),
            ("1m26.4s", ms(86_400)),
            ("8.64s", ms(8640)),
            ("0", ms(0)),
            ("0s", ms(0)),
            ("2h45m", ms(9_900_000)),
            (".5s", ms(500)),
            ("1.s", ms(1000)),
            ("1.5ms", Some(Duration::from_micros(1500))),
            ("1.5us", Some(Duration::from_nanos(1500))),
            ("1.5\u{b5}s", Some(Duration::from_nanos(1500))),
            ("1.5\u{3bc}s", Some(Duration::from_nanos(1500))),
            ("7ns", Some(Duration::from_nanos(7))),
            ("1s1s", ms(2000)),
        ] {
            assert_eq!(parse_go_duration(text), want, "{text:?}");
        }
    }

    #[test]
    fn go_durations_outside_the_grammar_are_none() {
        for text in [
            "", "s", "1", "00", "-1s", "+1s", "1 s", " 1s", "1s ", "1d", "1S", "1sec", "1M",
            "6M0s", "1.2.3s", ".s", ".", "1..5s", "1e3s", "1hh", "inf", "1s-", "µs", "1_000s",
        ] {
            assert_eq!(parse_go_duration(text), None, "{text:?}");
        }
    }

    #[test]
    fn go_durations_drop_what_is_below_a_nanosecond_and_saturate() {
        assert_eq!(
            parse_go_duration("1.0000000019s"),
            Some(Duration::from_nanos(1_000_000_001))
        );
        let long = format!("0.{}1s", "0".repeat(100));
        assert_eq!(parse_go_duration(&long), Some(Duration::ZERO));
        assert_eq!(
            parse_go_duration(&format!("{}h", "9".repeat(400))),
            Some(Duration::MAX)
        );
        assert_eq!(
            parse_go_duration("99999999999999999999h1s"),
            Some(Duration::MAX)
        );
    }

    fn unix(secs: u64, nanos: u32) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::new(secs, nanos))
    }

    #[test]
    fn rfc3339_times_as_anthropic_writes_them() {
        // 2026-12-02T10:00:30Z is 1,796,205,630 s after the epoch.
        for (text, want) in [
            ("2026-12-02T10:00:30Z", unix(1_796_205_630, 0)),
            ("2026-12-02t10:00:30z", unix(1_796_205_630, 0)),
            ("2026-12-02T10:00:30.25Z", unix(1_796_205_630, 250_000_000)),
            (
                "2026-12-02T10:00:30.123456789Z",
                unix(1_796_205_630, 123_456_789),
            ),
            (
                "2026-12-02T10:00:30.1234567899Z",
                unix(1_796_205_630, 123_456_789),
            ),
            ("2026-12-02T12:00:30+02:00", unix(1_796_205_630, 0)),
            (
                "2026-12-02T12:00:30.5+02:00",
                unix(1_796_205_630, 500_000_000),
            ),
            ("2026-12-02T04:30:30-05:30", unix(1_796_205_630, 0)),
            ("2026-12-02T10:00:30+00:00", unix(1_796_205_630, 0)),
            ("2026-12-02T10:00:30-00:00", unix(1_796_205_630, 0)),
            ("1970-01-01T00:00:00Z", unix(0, 0)),
            ("1970-01-01T01:00:00+01:00", unix(0, 0)),
            ("2028-02-29T00:00:00Z", unix(1_835_395_200, 0)),
            ("2000-02-29T00:00:00Z", unix(951_782_400, 0)),
            // A leap second is the second after :59.
            ("2016-12-31T23:59:60Z", unix(1_483_228_800, 0)),
            ("9999-12-31T23:59:59Z", unix(253_402_300_799, 0)),
        ] {
            assert_eq!(parse_rfc3339(text), want, "{text:?}");
        }
        assert_eq!(
            parse_rfc3339("1969-12-31T23:59:59Z"),
            UNIX_EPOCH.checked_sub(Duration::from_secs(1))
        );
    }

    #[test]
    fn rfc3339_times_outside_the_grammar_are_none() {
        for text in [
            "",
            "2026-12-02",
            "2026-12-02T10:00:30",
            "2026-12-02 10:00:30Z",
            "2026-12-02T10:00:30+0200",
            "2026-12-02T10:00:30+02",
            "2026-12-02T10:00:30 +02:00",
            "2026-12-02T10:00:30.Z",
            "2026-12-02T10:00:30,5Z",
            "2026-12-02T10:00:30ZZ",
            "2026-12-02T10:00:30Z ",
            " 2026-12-02T10:00:30Z",
            "2026-12-2T10:00:30Z",
            "26-12-02T10:00:30Z",
            "+2026-12-02T10:00:30Z",
            "2026-13-02T10:00:30Z",
            "2026-00-02T10:00:30Z",
            "2026-12-00T10:00:30Z",
            "2026-04-31T10:00:30Z",
            "2026-02-29T10:00:30Z",
            "1900-02-29T10:00:30Z",
            "2026-12-02T24:00:00Z",
            "2026-12-02T10:60:00Z",
            "2026-12-02T10:00:61Z",
            "2026-12-02T10:00:30+24:00",
            "2026-12-02T10:00:30+02:60",
            "2026-12-02T10:00:30-2:00",
            "2026-12-02T1a:00:30Z",
            "2026-12-02T10:00:30.5\u{e9}Z",
            "2026-12-02T10:00:30GMT",
            "Wed, 02 Dec 2026 10:00:30 GMT",
            "1796205630",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text:?}");
        }
    }

    /// `httpdate`'s calendar, which parses and prints HTTP dates, as the reference
    /// for ours: the same instant, written both ways.
    fn rfc3339_from_http_date(http: &str) -> String {
        // "Sun, 06 Nov 1994 08:49:37 GMT"
        let month = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|m| *m == &http[8..11])
        .unwrap()
            + 1;
        format!(
            "{}-{month:02}-{}T{}Z",
            &http[12..16],
            &http[5..7],
            &http[17..25]
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn rfc3339_agrees_with_httpdate_on_any_second(secs in 0u64..253_402_300_800) {
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            let text = rfc3339_from_http_date(&httpdate::fmt_http_date(at));
            prop_assert_eq!(parse_rfc3339(&text), Some(at), "{}", text);
        }

        #[test]
        fn go_durations_read_what_they_print(secs in 0u64..1_000_000, nanos in 0u32..1_000_000_000) {
            // Go's way of printing: hours, minutes, then seconds with their fraction.
            let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
            let text = format!("{h}h{m}m{s}.{nanos:09}s");
            prop_assert_eq!(parse_go_duration(&text), Some(Duration::new(secs, nanos)));
        }

        #[test]
        fn the_parsers_never_panic(text in "\\PC{0,40}", near in "[0-9.hmsuµμnTZ:+-]{0,30}") {
            let _ = parse_go_duration(&text);
            let _ = parse_go_duration(&near);
            let _ = parse_rfc3339(&text);
            let _ = parse_rfc3339(&near);
        }
    }
}
