//! The server's hint of when to call again: `retry-after-ms`, then `Retry-After`.
//!
//! Read by the retry layer, for how long to wait before a retry, and by the concurrency
//! layer's rate-limit pacing, for how long to hold new calls after a 429.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// The delay the response asks for, if it asks in a form we understand.
///
/// `retry-after-ms` (milliseconds, decimals allowed) comes first, as in the OpenAI and
/// Anthropic SDKs, then `Retry-After` as delay-seconds (decimals allowed) or an HTTP
/// date (relative to `now`). Negative, non-numeric and otherwise garbled values are
/// ignored (a retry then waits for the policy's backoff), and so are zero and a date in
/// the past: a retry at once, in the same poll and without jitter, would turn every
/// attempt of a herd of callers into one burst. A value too large for a `Duration` saturates, so it
/// is above any `max_retry_after`.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    any_hint(headers, now).filter(|hint| !hint.is_zero())
}

fn any_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = value("retry-after-ms").and_then(non_negative) {
        return Some(seconds(ms / 1000.0));
    }
    let value = value(http::header::RETRY_AFTER.as_str())?;
    if let Some(secs) = non_negative(value) {
        return Some(seconds(secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

fn non_negative(text: &str) -> Option<f64> {
    // Plain decimal numbers only: no sign, exponent, `inf` or `nan`.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    text.parse::<f64>().ok()
}

fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(pairs: &[(&'static str, &'static str)]) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        retry_after(&headers, now)
    }

    #[test]
    fn seconds_and_milliseconds() {
        assert_eq!(hint(&[("retry-after", "5")]), Some(Duration::from_secs(5)));
        assert_eq!(
            hint(&[("retry-after", " 1.5 ")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            hint(&[("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn zero_and_the_past_are_no_hint() {
        for zero in ["0", "0.0", "000"] {
            assert_eq!(hint(&[("retry-after", zero)]), None, "{zero:?}");
            assert_eq!(hint(&[("retry-after-ms", zero)]), None, "{zero:?}");
        }
        // A zero `retry-after-ms` is no hint, and neither is what follows it here.
        assert_eq!(hint(&[("retry-after-ms", "0"), ("retry-after", "0")]), None);
        assert_eq!(
            hint(&[("retry-after", "0.001")]),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn milliseconds_win_over_seconds() {
        assert_eq!(
            hint(&[("retry-after-ms", "100"), ("retry-after", "9")]),
            Some(Duration::from_millis(100))
        );
        // A garbled `retry-after-ms` falls back to `Retry-After`.
        assert_eq!(
            hint(&[("retry-after-ms", "soon"), ("retry-after", "9")]),
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn http_dates_are_relative_to_now() {
        assert_eq!(
            hint(&[("retry-after", "Wed, 21 Oct 2026 07:28:30 GMT")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            hint(&[("retry-after", "Wed, 21 Oct 2026 07:00:00 GMT")]),
            None,
            "in the past"
        );
    }

    #[test]
    fn garbage_and_negatives_are_ignored() {
        for bad in [
            "-1", "soon", "", "1e3", "inf", "NaN", "+5", "5s", "1.2.3", ".",
        ] {
            assert_eq!(hint(&[("retry-after", bad)]), None, "{bad:?}");
            assert_eq!(hint(&[("retry-after-ms", bad)]), None, "{bad:?}");
        }
        assert_eq!(hint(&[]), None);
    }

    #[test]
    fn absurdly_large_values_saturate() {
        let huge = "9".repeat(400);
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", huge.parse().unwrap());
        assert_eq!(
            retry_after(&headers, SystemTime::UNIX_EPOCH),
            Some(Duration::MAX)
        );
        assert_eq!(
            hint(&[("retry-after", "99999999999999999999999")]),
            Some(Duration::MAX)
        );
    }
}
