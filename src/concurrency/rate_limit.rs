//! Rate-limit pacing: when a provider's response says new calls may go out again.
//!
//! # Why
//!
//! LLM providers limit each account's requests and tokens per window, and say in every
//! response how much of the window is left and when it resets. Once nothing is left,
//! each call before the reset is refused with a 429. Sent anyway, every one of them
//! learns that for itself: a round trip to hear what the last response already said, a
//! retry attempt and a unit of retry budget spent on it, and at OpenAI a refused
//! request still counts against the per-minute limit, so a herd of them pushes the
//! reset further out. Pacing reads the signal once and holds new calls at the layer
//! until the reset: a caller that can wait waits there, one that cannot is turned away
//! at once, and no HTTP call is made to be refused.
//!
//! # What is read
//!
//! [`hold`] reads a response head and says how long new calls must wait:
//!
//! | provider | when | the wait |
//! |---|---|---|
//! | OpenAI | `x-ratelimit-remaining-requests: 0` | `x-ratelimit-reset-requests`, a Go duration (`1s`, `6m0s`, `20ms`) |
//! | OpenAI | `x-ratelimit-remaining-tokens: 0` | `x-ratelimit-reset-tokens`, the same |
//! | Anthropic | `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-remaining: 0` | the matching `...-reset`, an RFC 3339 time, less now |
//! | any | a 429 with `retry-after-ms` or `Retry-After` | that hint, read as the retry layer reads it |
//!
//! A remaining count above zero holds nothing. When several say so at once, the longest
//! wait holds. Anthropic says its limits refill continuously (a token bucket), and
//! OpenAI's own example (59 of 60 requests left, reset in 1 s) reads the same way: a
//! reset is when the limit is full again, so with nothing left the next call could often
//! go out sooner. Holding until the reset errs on the side of not earning a 429; a
//! 429's `Retry-After` is the provider's own figure for the next call.
//!
//! # What is ignored
//!
//! - A remaining count that is not a plain number, a reset not in its provider's
//!   format, a zero count without its reset, and a wait above [`LONGEST_HOLD`]: each is
//!   ignored with a `DEBUG` event naming the header and its value, and the other
//!   headers still count. No bytes make it panic.
//! - A zero wait or a reset already past: nothing to hold.
//! - `Retry-After` on any status but 429: a 503's hint is about that server, which the
//!   retry layer reads, not about the account's limit.
//!
//! Anthropic's resets are times, read against this host's clock: a clock behind the
//! provider's holds calls longer than needed (bounded by [`LONGEST_HOLD`]), one ahead
//! holds them shorter.
//!
//! # The gate
//!
//! A layer keeps one [`Gate`], shared by its service's clones: closed until the latest
//! reset it was told of. A later reset moves it, an earlier one does nothing, so the
//! responses of calls that were in flight when the limit ran out cannot open it early.
//! Looking costs one atomic load. Closing it is an `INFO` event with the wait and the
//! header that said so, and so is the first look that finds it open again.
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
//! else. Both grammars are small enough to parse strictly here, each parser tested
//! against its grammar, and the calendar against `httpdate`'s.
//!
//! # Sources
//!
//! - OpenAI, "Rate limits", section "Rate limits in headers":
//!   <https://platform.openai.com/docs/guides/rate-limits>; and "How can I solve 429:
//!   'Too Many Requests' errors?" (refused requests count against the per-minute
//!   limit): <https://help.openai.com/en/articles/5955604>
//! - Anthropic, "Rate limits", section "Response headers" (RFC 3339 resets, the token
//!   bucket, `retry-after` on a 429): <https://docs.anthropic.com/en/api/rate-limits>
//! - Go's duration grammar: <https://pkg.go.dev/time#ParseDuration>
//! - RFC 3339, section 5.6: <https://www.rfc-editor.org/rfc/rfc3339#section-5.6>
//! - RFC 9110, section 10.2.3 (`Retry-After`):
//!   <https://www.rfc-editor.org/rfc/rfc9110#section-10.2.3>

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::retry_after::retry_after;

/// The longest wait a header is believed for: one hour.
///
/// Per-minute limits reset within the minute, and a 429's hint is seconds. A longer
/// wait is a daily quota, a garbled value or a clock far off: holding every call of a
/// layer for hours on one header would take the service down on a misreading, and a
/// quota that long is better told to callers by the provider's own 429s.
pub(crate) const LONGEST_HOLD: Duration = Duration::from_secs(3600);

/// OpenAI's (remaining, reset) pairs; the resets are Go durations.
const OPENAI: [(&str, &str); 2] = [
    (
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
];

/// Anthropic's (remaining, reset) pairs; the resets are RFC 3339 times.
const ANTHROPIC: [(&str, &str); 4] = [
    (
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ),
    (
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ),
    (
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ),
    (
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ),
];

/// What a 429's hint is named in events: `Retry-After` or `retry-after-ms`, whichever
/// [`retry_after`] read.
const RETRY_AFTER: &str = "retry-after";

/// New calls must wait: for how long, and which header said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hold {
    /// Above zero, at most [`LONGEST_HOLD`].
    pub(crate) wait: Duration,
    /// The header the wait was read from: a reset, or `retry-after`.
    pub(crate) by: &'static str,
}

impl Hold {
    /// When the hold ends, for a wait that starts at `now`.
    pub(crate) fn until(&self, now: Instant) -> Instant {
        crate::deadline::from(now, self.wait)
    }
}

/// How long new calls must wait after a response with this head, or `None`.
///
/// `now` is the time the response came, for Anthropic's resets and an HTTP-date
/// `Retry-After`; `provider` names the layer in the `DEBUG` events for ignored values.
/// See the [module docs](self) for what is read and what is ignored.
pub(crate) fn hold(
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
    provider: &str,
) -> Option<Hold> {
    let openai = OPENAI.iter().filter_map(|&(remaining, reset)| {
        reset_wait(headers, remaining, reset, provider, parse_go_duration)
    });
    let anthropic = ANTHROPIC.iter().filter_map(|&(remaining, reset)| {
        reset_wait(headers, remaining, reset, provider, |text| {
            let at = parse_rfc3339(text)?;
            // A reset already past holds nothing.
            Some(at.duration_since(now).unwrap_or(Duration::ZERO))
        })
    });
    let retry = (status == StatusCode::TOO_MANY_REQUESTS)
        .then(|| too_many_requests(headers, now, provider))
        .flatten();
    openai
        .chain(anthropic)
        .chain(retry)
        .max_by_key(|hold| hold.wait)
}

/// The wait of one (remaining, reset) pair: `None` unless the remaining count is zero
/// and the reset, read by `parse`, is a credible wait.
fn reset_wait(
    headers: &HeaderMap,
    remaining: &'static str,
    reset: &'static str,
    provider: &str,
    parse: impl FnOnce(&str) -> Option<Duration>,
) -> Option<Hold> {
    let count = headers.get(remaining)?;
    let digits = count
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()));
    let Some(digits) = digits else {
        tracing::debug!(
            provider,
            header = remaining,
            value = ?count,
            "rate-limit count not understood: ignored"
        );
        return None;
    };
    if digits.bytes().any(|b| b != b'0') {
        return None;
    }
    let Some(value) = headers.get(reset) else {
        tracing::debug!(
            provider,
            header = remaining,
            missing = reset,
            "rate limit at zero without its reset: ignored"
        );
        return None;
    };
    let Some(wait) = value.to_str().ok().map(str::trim).and_then(parse) else {
        tracing::debug!(
            provider,
            header = reset,
            value = ?value,
            "rate-limit reset not understood: ignored"
        );
        return None;
    };
    credible(wait, reset, value, provider)
}

/// A 429's `retry-after-ms` or `Retry-After`, read as the retry layer reads it.
fn too_many_requests(headers: &HeaderMap, now: SystemTime, provider: &str) -> Option<Hold> {
    let (ms, secs) = (headers.get("retry-after-ms"), headers.get(RETRY_AFTER));
    let Some(wait) = retry_after(headers, now) else {
        if ms.is_some() || secs.is_some() {
            tracing::debug!(
                provider,
                retry_after_ms = ?ms,
                retry_after = ?secs,
                "429 hint zero, past or not understood: ignored"
            );
        }
        return None;
    };
    // Never zero: `retry_after` says so.
    if wait > LONGEST_HOLD {
        tracing::debug!(
            provider,
            retry_after_ms = ?ms,
            retry_after = ?secs,
            "429 hint longer than an hour: ignored"
        );
        return None;
    }
    Some(Hold {
        wait,
        by: RETRY_AFTER,
    })
}

/// A reset's `wait` as a hold, unless it is zero (nothing to hold) or above
/// [`LONGEST_HOLD`].
fn credible(wait: Duration, by: &'static str, value: &HeaderValue, provider: &str) -> Option<Hold> {
    if wait.is_zero() {
        return None;
    }
    if wait > LONGEST_HOLD {
        tracing::debug!(
            provider,
            header = by,
            value = ?value,
            "rate-limit wait longer than an hour: ignored"
        );
        return None;
    }
    Some(Hold { wait, by })
}

/// Whether new calls through one layer may go out, or must wait for a rate limit's
/// reset.
///
/// One atomic word, so that each call looks at it for the price of a load: the instant
/// the gate opens, in nanoseconds after the gate was made, or zero once the gate has
/// been seen open (and before it ever closed). It is `Sync`: a layer's service clones
/// share one behind their `Arc`.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The instant `opens_at` counts from.
    origin: Instant,
    /// When the gate opens, in nanoseconds after `origin`; zero when seen open.
    opens_at: AtomicU64,
}

// Relaxed throughout: the word publishes nothing but itself, and its read-modify-writes
// (`fetch_max`, `compare_exchange`) act on the latest value whatever the ordering.
impl Gate {
    /// An open gate.
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            opens_at: AtomicU64::new(0),
        }
    }

    /// Closes the gate until `at`, or leaves it closed until later: a later reset wins,
    /// an earlier one, or one not after `now`, does nothing. Whether it moved.
    ///
    /// The gate closing is an `INFO` event with the wait and the header that said so
    /// (`by`). A closed gate's opening moved later is a `DEBUG` event: each call in
    /// flight when the limit ran out may say so again.
    pub(crate) fn close_until(
        &self,
        now: Instant,
        at: Instant,
        by: &'static str,
        provider: &str,
    ) -> bool {
        if at <= now {
            return false;
        }
        let nanos = self.nanos(at);
        let before = self.opens_at.fetch_max(nanos, Ordering::Relaxed);
        if before >= nanos {
            return false;
        }
        let wait_ms = (at - now).as_millis() as u64;
        if before == 0 || self.instant(before) <= now {
            tracing::info!(
                provider,
                by,
                wait_ms,
                "rate limit reached: new calls wait for its reset"
            );
        } else {
            tracing::debug!(
                provider,
                by,
                wait_ms,
                "rate limit: a later reset moves the gate's opening"
            );
        }
        true
    }

    /// Whether a call may go out at `now`. The first look that finds the gate open
    /// after a hold is an `INFO` event; the others are silent.
    pub(crate) fn is_open(&self, now: Instant, provider: &str) -> bool {
        let mut nanos = self.opens_at.load(Ordering::Relaxed);
        loop {
            if nanos == 0 {
                return true;
            }
            if self.instant(nanos) > now {
                return false;
            }
            // Open: the one look that swaps the reset for zero says so. A gate closed
            // again meanwhile fails the swap and is looked at anew.
            match self.opens_at.compare_exchange_weak(
                nanos,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    tracing::info!(provider, "rate limit reset: new calls go out again");
                    return true;
                }
                Err(current) => nanos = current,
            }
        }
    }

    /// When the gate opens: `None` once it has been seen open (or never closed),
    /// otherwise the reset, which is past if no call has looked since.
    pub(crate) fn opens_at(&self) -> Option<Instant> {
        match self.opens_at.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(self.instant(nanos)),
        }
    }

    /// `at` in nanoseconds after the origin, saturating, and at least 1 (zero is open;
    /// an `at` before the origin comes with a `now` from before the gate was made).
    fn nanos(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }

    fn instant(&self, nanos: u64) -> Instant {
        crate::deadline::from(self.origin, Duration::from_nanos(nanos))
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

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
    use proptest::prelude::*;
    use tower_stream_backpressure_testkit::events::Recorder;
    use tracing::Level;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    /// 2026-12-02T10:00:00Z, the time the responses below come.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_796_205_600)
    }

    fn hold_of(status: u16, pairs: &[(&'static str, &str)]) -> Option<Hold> {
        let status = StatusCode::from_u16(status).unwrap();
        hold(status, &headers(pairs), now(), "test")
    }

    fn held(secs: f64, by: &'static str) -> Option<Hold> {
        Some(Hold {
            wait: Duration::from_secs_f64(secs),
            by,
        })
    }

    #[test]
    fn openai_at_zero_holds_until_the_reset() {
        for (reset, secs) in [
            ("6m0s", 360.0),
            ("1s", 1.0),
            ("20ms", 0.02),
            ("2m3.5s", 123.5),
            ("1h0m0s", 3600.0),
        ] {
            assert_eq!(
                hold_of(
                    200,
                    &[
                        ("x-ratelimit-remaining-requests", "0"),
                        ("x-ratelimit-reset-requests", reset),
                    ]
                ),
                held(secs, "x-ratelimit-reset-requests"),
                "{reset}"
            );
        }
        assert_eq!(
            hold_of(
                200,
                &[
                    ("x-ratelimit-remaining-tokens", " 0 "),
                    ("x-ratelimit-reset-tokens", " 0.5s "),
                ]
            ),
            held(0.5, "x-ratelimit-reset-tokens")
        );
        // A 429 holds the same way.
        assert_eq!(
            hold_of(
                429,
                &[
                    ("x-ratelimit-remaining-tokens", "000"),
                    ("x-ratelimit-reset-tokens", "2s"),
                ]
            ),
            held(2.0, "x-ratelimit-reset-tokens")
        );
    }

    #[test]
    fn a_count_above_zero_or_a_zero_wait_holds_nothing() {
        for remaining in ["1", "59", "0010", "99999999999999999999999999"] {
            assert_eq!(
                hold_of(
                    200,
                    &[
                        ("x-ratelimit-remaining-requests", remaining),
                        ("x-ratelimit-reset-requests", "6m0s"),
                        ("anthropic-ratelimit-requests-remaining", remaining),
                        ("anthropic-ratelimit-requests-reset", "2026-12-02T10:00:30Z"),
                    ]
                ),
                None,
                "{remaining}"
            );
        }
        // The reset is not read, so a garbled one says nothing either.
        let (hold, events) = Recorder::recorded(|| {
            hold_of(
                200,
                &[
                    ("x-ratelimit-remaining-requests", "3"),
                    ("x-ratelimit-reset-requests", "soon"),
                ],
            )
        });
        assert_eq!(hold, None);
        assert!(events.is_empty(), "{events:?}");
        // A reset that is now, or past, holds nothing and is no error.
        let (hold, events) = Recorder::recorded(|| {
            hold_of(
                200,
                &[
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "0s"),
                    ("anthropic-ratelimit-tokens-remaining", "0"),
                    ("anthropic-ratelimit-tokens-reset", "2026-12-02T10:00:00Z"),
                    ("anthropic-ratelimit-requests-remaining", "0"),
                    ("anthropic-ratelimit-requests-reset", "2026-12-02T09:59:00Z"),
                ],
            )
        });
        assert_eq!(hold, None);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(hold_of(200, &[]), None);
    }

    #[test]
    fn anthropic_resets_are_times_less_now() {
        for (remaining, reset) in ANTHROPIC {
            for (at, secs) in [
                ("2026-12-02T10:00:30Z", 30.0),
                ("2026-12-02T10:00:00.25Z", 0.25),
                ("2026-12-02T11:01:00+01:00", 60.0),
                ("2026-12-02T04:30:05.5-05:30", 5.5),
            ] {
                assert_eq!(
                    hold_of(200, &[(remaining, "0"), (reset, at)]),
                    held(secs, reset),
                    "{reset}: {at}"
                );
            }
        }
    }

    #[test]
    fn a_429_hint_holds_and_other_statuses_do_not() {
        assert_eq!(
            hold_of(429, &[("retry-after", "5")]),
            held(5.0, "retry-after")
        );
        assert_eq!(
            hold_of(429, &[("retry-after-ms", "250"), ("retry-after", "9")]),
            held(0.25, "retry-after")
        );
        assert_eq!(
            hold_of(429, &[("retry-after", "Wed, 02 Dec 2026 10:00:40 GMT")]),
            held(40.0, "retry-after")
        );
        for status in [200, 408, 500, 503, 529] {
            assert_eq!(hold_of(status, &[("retry-after", "5")]), None, "{status}");
        }
        assert_eq!(hold_of(429, &[]), None);
    }

    #[test]
    fn a_hold_ends_its_wait_after_now() {
        let now = Instant::now();
        let hold = held(1.5, "retry-after").unwrap();
        assert_eq!(hold.until(now), now + Duration::from_millis(1500));
    }

    #[test]
    fn the_longest_wait_holds() {
        let pairs = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-12-02T10:00:30Z",
            ),
            ("retry-after", "20"),
        ];
        assert_eq!(
            hold_of(429, &pairs),
            held(360.0, "x-ratelimit-reset-tokens")
        );
        assert_eq!(
            hold_of(429, &[pairs[0], pairs[1], pairs[4], pairs[5], pairs[6]]),
            held(30.0, "anthropic-ratelimit-output-tokens-reset")
        );
        assert_eq!(
            hold_of(429, &[pairs[0], pairs[1], pairs[6]]),
            held(20.0, "retry-after")
        );
    }

    #[test]
    fn malformed_and_absurd_values_are_ignored_with_a_debug_event() {
        // Status, headers, and the header and value the event names.
        type Case = (
            u16,
            &'static [(&'static str, &'static str)],
            &'static str,
            &'static str,
        );
        let cases: &[Case] = &[
            (
                200,
                &[("x-ratelimit-remaining-requests", "none")],
                "x-ratelimit-remaining-requests",
                "\"none\"",
            ),
            (
                200,
                &[("x-ratelimit-remaining-tokens", "-1")],
                "x-ratelimit-remaining-tokens",
                "\"-1\"",
            ),
            (
                200,
                &[("anthropic-ratelimit-tokens-remaining", "0.0")],
                "anthropic-ratelimit-tokens-remaining",
                "\"0.0\"",
            ),
            (
                200,
                &[("anthropic-ratelimit-requests-remaining", "")],
                "anthropic-ratelimit-requests-remaining",
                "\"\"",
            ),
            (
                200,
                &[
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "6 minutes"),
                ],
                "x-ratelimit-reset-requests",
                "\"6 minutes\"",
            ),
            (
                200,
                &[
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "-1s"),
                ],
                "x-ratelimit-reset-requests",
                "\"-1s\"",
            ),
            (
                200,
                &[
                    ("x-ratelimit-remaining-tokens", "0"),
                    ("x-ratelimit-reset-tokens", "2h"),
                ],
                "x-ratelimit-reset-tokens",
                "\"2h\"",
            ),
            (
                200,
                &[
                    ("anthropic-ratelimit-input-tokens-remaining", "0"),
                    (
                        "anthropic-ratelimit-input-tokens-reset",
                        "2026-12-02 10:00:30",
                    ),
                ],
                "anthropic-ratelimit-input-tokens-reset",
                "\"2026-12-02 10:00:30\"",
            ),
            (
                200,
                &[
                    ("anthropic-ratelimit-requests-remaining", "0"),
                    ("anthropic-ratelimit-requests-reset", "2026-12-03T10:00:00Z"),
                ],
                "anthropic-ratelimit-requests-reset",
                "\"2026-12-03T10:00:00Z\"",
            ),
        ];
        for (status, pairs, header, value) in cases {
            let (hold, events) = Recorder::recorded(|| hold_of(*status, pairs));
            assert_eq!(hold, None, "{pairs:?}");
            let [event] = &events[..] else {
                panic!("one event for {pairs:?}, not {events:?}")
            };
            assert_eq!(event.level, Level::DEBUG, "{event:?}");
            assert!(event.message.contains("ignored"), "{event:?}");
            assert_eq!(event.fields["provider"], "test", "{event:?}");
            assert_eq!(event.fields["header"], *header, "{event:?}");
            assert_eq!(event.fields["value"], *value, "{event:?}");
        }

        // A zero count without its reset names the reset it missed.
        let (hold, events) =
            Recorder::recorded(|| hold_of(200, &[("x-ratelimit-remaining-requests", "0")]));
        assert_eq!(hold, None);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].fields["missing"], "x-ratelimit-reset-requests");

        // Bytes that are not text.
        let mut bytes = HeaderMap::new();
        bytes.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_bytes(b"\xff0").unwrap(),
        );
        let (hold, events) =
            Recorder::recorded(|| super::hold(StatusCode::OK, &bytes, now(), "test"));
        assert_eq!(hold, None);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].fields["value"], "\"\\xff0\"");

        // A 429's hint garbled, or longer than an hour.
        for value in ["soon", "7200", "Thu, 03 Dec 2026 10:00:00 GMT"] {
            let (hold, events) = Recorder::recorded(|| hold_of(429, &[("retry-after", value)]));
            assert_eq!(hold, None, "{value}");
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(events[0].level, Level::DEBUG);
            assert_eq!(events[0].fields["retry_after"], format!("Some({value:?})"));
        }
    }

    #[test]
    fn an_ignored_value_leaves_the_others_counting() {
        let (hold, events) = Recorder::recorded(|| {
            hold_of(
                429,
                &[
                    ("x-ratelimit-remaining-requests", "garbage"),
                    ("x-ratelimit-remaining-tokens", "0"),
                    ("x-ratelimit-reset-tokens", "3s"),
                    ("anthropic-ratelimit-tokens-remaining", "0"),
                    ("anthropic-ratelimit-tokens-reset", "tomorrow"),
                    ("retry-after", "99999"),
                ],
            )
        });
        assert_eq!(hold, held(3.0, "x-ratelimit-reset-tokens"));
        assert_eq!(events.len(), 3, "{events:?}");
    }

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

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_opens_at_the_reset() {
        let gate = Gate::new();
        let start = Instant::now();
        assert!(gate.is_open(start, "test"));
        assert_eq!(gate.opens_at(), None);

        assert!(gate.close_until(start, start + secs(5), "retry-after", "test"));
        assert!(!gate.is_open(Instant::now(), "test"));
        assert_eq!(gate.opens_at(), Some(start + secs(5)));

        tokio::time::advance(Duration::from_millis(4999)).await;
        assert!(!gate.is_open(Instant::now(), "test"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(gate.is_open(Instant::now(), "test"));
        assert_eq!(gate.opens_at(), None);
        assert!(gate.is_open(Instant::now(), "test"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_reset_moves_the_gate_and_an_earlier_one_does_nothing() {
        let gate = Gate::default();
        let start = Instant::now();
        assert!(gate.close_until(start, start + secs(5), "x-ratelimit-reset-requests", "test"));
        assert!(!gate.close_until(start, start + secs(3), "retry-after", "test"));
        assert!(!gate.close_until(start, start + secs(5), "retry-after", "test"));
        assert_eq!(gate.opens_at(), Some(start + secs(5)));
        assert!(gate.close_until(start, start + secs(8), "x-ratelimit-reset-tokens", "test"));
        assert_eq!(gate.opens_at(), Some(start + secs(8)));

        tokio::time::advance(secs(5)).await;
        assert!(
            !gate.is_open(Instant::now(), "test"),
            "the later reset holds"
        );
        tokio::time::advance(secs(3)).await;
        assert!(gate.is_open(Instant::now(), "test"));

        // A reset not after now closes nothing.
        let now = Instant::now();
        assert!(!gate.close_until(now, now, "retry-after", "test"));
        assert!(!gate.close_until(now, start, "retry-after", "test"));
        assert!(gate.is_open(now, "test"));
        assert_eq!(gate.opens_at(), None);

        // Nor can a far reset overflow: it holds, far off.
        assert!(gate.close_until(now, now + secs(u64::from(u32::MAX)), "retry-after", "test"));
        assert!(!gate.is_open(now + secs(3600), "test"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_closes_the_gate_for_its_wait() {
        let gate = Gate::new();
        let now = Instant::now();
        let hold = hold_of(429, &[("retry-after", "2")]).unwrap();
        assert!(gate.close_until(now, hold.until(now), hold.by, "test"));
        assert_eq!(gate.opens_at(), Some(now + secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_says_when_it_closes_and_once_when_it_opens() {
        let recorder = Recorder::default();
        let _default = tracing::subscriber::set_default(recorder.clone());
        let gate = Gate::new();
        let start = Instant::now();

        gate.close_until(
            start,
            start + secs(5),
            "x-ratelimit-reset-requests",
            "openai",
        );
        let events = recorder.take();
        let [closed] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(closed.level, Level::INFO);
        assert_eq!(
            closed.message,
            "rate limit reached: new calls wait for its reset"
        );
        assert_eq!(closed.fields["provider"], "openai");
        assert_eq!(closed.fields["by"], "x-ratelimit-reset-requests");
        assert_eq!(closed.fields["wait_ms"], "5000");

        // Moved later: DEBUG. Earlier, or looked at while closed: nothing.
        gate.close_until(start, start + secs(6), "retry-after", "openai");
        gate.close_until(start, start + secs(1), "retry-after", "openai");
        assert!(!gate.is_open(start, "openai"));
        let events = recorder.take();
        let [moved] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(moved.level, Level::DEBUG);
        assert_eq!(moved.fields["wait_ms"], "6000");

        tokio::time::advance(secs(6)).await;
        for _ in 0..3 {
            assert!(gate.is_open(Instant::now(), "openai"));
        }
        let events = recorder.take();
        let [opened] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(opened.level, Level::INFO);
        assert_eq!(opened.message, "rate limit reset: new calls go out again");
        assert_eq!(opened.fields["provider"], "openai");

        // A reset past but not yet seen: closing again is closing, not moving.
        let now = Instant::now();
        gate.close_until(now, now + secs(1), "retry-after", "openai");
        tokio::time::advance(secs(2)).await;
        let now = Instant::now();
        gate.close_until(now, now + secs(1), "retry-after", "openai");
        let events = recorder.take();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events.iter().all(|e| e.level == Level::INFO), "{events:?}");
    }

    #[test]
    fn threads_share_one_gate_and_one_opening() {
        for _ in 0..50 {
            let recorder = Recorder::default();
            let gate = Gate::new();
            let start = Instant::now();
            std::thread::scope(|scope| {
                for i in 1..=8 {
                    let (gate, recorder) = (&gate, recorder.clone());
                    scope.spawn(move || {
                        let _default = tracing::subscriber::set_default(recorder);
                        gate.close_until(start, start + secs(i), "retry-after", "test");
                        assert!(!gate.is_open(start, "test"));
                    });
                }
            });
            assert_eq!(gate.opens_at(), Some(start + secs(8)), "the latest reset");
            let closed = recorder.take();
            assert_eq!(
                closed.iter().filter(|e| e.level == Level::INFO).count(),
                1,
                "{closed:?}"
            );

            let later = start + secs(8);
            std::thread::scope(|scope| {
                for _ in 0..8 {
                    let (gate, recorder) = (&gate, recorder.clone());
                    scope.spawn(move || {
                        let _default = tracing::subscriber::set_default(recorder);
                        assert!(gate.is_open(later, "test"));
                    });
                }
            });
            let opened = recorder.take();
            assert_eq!(opened.len(), 1, "{opened:?}");
        }
    }

    /// Every header [`hold`] reads.
    fn all_headers() -> Vec<&'static str> {
        let pairs = OPENAI.iter().chain(&ANTHROPIC);
        let mut names: Vec<_> = pairs.flat_map(|&(a, b)| [a, b]).collect();
        names.extend(["retry-after", "retry-after-ms"]);
        names
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
        fn no_header_bytes_make_it_panic(
            status in prop::sample::select(vec![200u16, 429, 503]),
            values in prop::collection::vec(
                (
                    prop::sample::select(all_headers()),
                    prop_oneof![
                        prop::collection::vec(any::<u8>(), 0..24),
                        "[0-9]{0,3}".prop_map(String::into_bytes),
                        "[0-9.hmsuµμn-]{0,12}".prop_map(String::into_bytes),
                        // Credible waits, so that holds come out too.
                        "[0-9]{1,2}(ms|s|m)".prop_map(String::into_bytes),
                        "2026-12-02T10:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,3})?Z".prop_map(String::into_bytes),
                        "20[0-9]{2}-1[0-2]-0[1-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{1,12})?(Z|[+-][0-2][0-9]:[0-5][0-9])"
                            .prop_map(String::into_bytes),
                    ],
                ),
                0..12,
            ),
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in values {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    headers.append(name, value);
                }
            }
            let status = StatusCode::from_u16(status).unwrap();
            if let Some(hold) = hold(status, &headers, now(), "test") {
                prop_assert!(!hold.wait.is_zero() && hold.wait <= LONGEST_HOLD, "{:?}", hold);
                prop_assert!(headers.contains_key(hold.by) || hold.by == RETRY_AFTER, "{:?}", hold);
            }
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
