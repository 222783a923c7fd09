use std::error::Error;
use std::io;

/// The default error classifier: whether an error from the inner service is transient
/// and safe to retry for a request that has not produced a first chunk.
///
/// Walks the error and its [`source`](Error::source) chain, and returns `true` for:
/// - a connect failure (hyper-util's legacy client `Error::is_connect`: nothing was
///   sent), except one that a retry would only repeat: a TLS handshake or certificate
///   failure, a name that does not resolve, an invalid URI (see below);
/// - an HTTP/2 `REFUSED_STREAM` (the server did no processing, RFC 9113 §8.7), a
///   GOAWAY sent by the server (the stream was not processed or the connection went
///   away), or a stream the server reset with `INTERNAL_ERROR` or `CANCEL` (HTTP/2's
///   connection reset) or `ENHANCE_YOUR_CALM` (its 429);
/// - I/O errors `ConnectionRefused`, `ConnectionReset`, `ConnectionAborted`,
///   `BrokenPipe`, `UnexpectedEof`;
/// - hyper errors for a connection that closed before the response completed
///   (`is_incomplete_message`, `is_canceled`, `is_closed`).
///
/// The hyper, h2 and hyper-util errors are read with the feature `hyper-errors` (on by
/// default); without it, only the [`io::Error`] kinds are.
///
/// Everything else (a malformed request, a body that could not be sent) is not
/// retried. Compose it with your own rules through
/// [`RetryPolicy::classify_errors`](super::RetryPolicy::classify_errors).
///
/// A connect error is returned at once, not retried, when its source chain holds:
/// - an [`io::Error`] of kind [`InvalidData`](io::ErrorKind::InvalidData): how
///   tokio-rustls (under hyper-rustls) reports a failed handshake or a rejected
///   certificate; a plain TCP connect never fails so;
/// - an error whose message names a `certificate` or a `handshake` (case ignored): how
///   native-tls (under hyper-tls) reports them, as text only;
/// - hyper-util's `HttpConnector` error `dns error` (the name did not resolve) or
///   `invalid URL, ...` (no scheme, no host, or not `http` when it enforces `http`).
///   That error type is private: its message is all there is to read, so it is matched
///   exactly as hyper-util words it.
///
/// ```
/// use std::io;
/// use tower_stream_backpressure::retry::is_transient;
///
/// assert!(is_transient(&io::Error::from(io::ErrorKind::ConnectionReset)));
/// assert!(!is_transient(&io::Error::from(io::ErrorKind::PermissionDenied)));
/// ```
pub fn is_transient(error: &(dyn Error + 'static)) -> bool {
    if let Some(connect) = chain(error).find(|error| reasons::is_connect_error(*error)) {
        return !chain(connect).any(repeats_on_retry);
    }
    chain(error).any(is_transient_itself)
}

/// Whether an error from the inner service proves that the upstream did no processing
/// of the request: then a retry cannot repeat its side effects, whatever they are.
///
/// [`RetryPolicy::retry_maybe_processed(false)`](super::RetryPolicy::retry_maybe_processed)
/// retries only such errors (among those [`is_transient`] or your classifier accepts).
/// Walks the error and its [`source`](Error::source) chain, and returns `true` for:
/// - a connect failure (hyper-util's legacy client `Error::is_connect`) and an
///   [`io::Error`] of kind `ConnectionRefused`: no byte of the request was written;
/// - an HTTP/2 `REFUSED_STREAM` (RFC 9113 §8.7: the server did no processing);
/// - a GOAWAY from the server whose last stream id is below ours: h2 fails a stream
///   with the GOAWAY's error only then (a stream the GOAWAY covers may have been
///   processed, and fails otherwise when the connection closes);
/// - a request hyper cancelled before sending it (`hyper::Error::is_canceled`: its
///   connection closed while the request waited for it).
///
/// (The hyper, h2 and hyper-util errors are read with the feature `hyper-errors`.)
///
/// Everything else may have been processed: a reset or an end of the connection after
/// the request was written (`ConnectionReset`, `BrokenPipe`, `UnexpectedEof`, hyper's
/// incomplete message), a stream the server reset with `INTERNAL_ERROR`, `CANCEL` or
/// `ENHANCE_YOUR_CALM`, any error this function does not know.
///
/// ```
/// use std::io;
/// use tower_stream_backpressure::retry::{is_transient, is_unprocessed};
///
/// let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
/// assert!(is_transient(&refused) && is_unprocessed(&refused));
/// // The request was written, then the connection reset: the upstream may have it.
/// let reset = io::Error::from(io::ErrorKind::ConnectionReset);
/// assert!(is_transient(&reset) && !is_unprocessed(&reset));
/// ```
pub fn is_unprocessed(error: &(dyn Error + 'static)) -> bool {
    chain(error).any(|error| {
        if reasons::is_connect_error(error) {
            return true;
        }
        if let Some(unprocessed) = reasons::unprocessed(error) {
            return unprocessed;
        }
        if let Some(error) = error.downcast_ref::<io::Error>() {
            return error.kind() == io::ErrorKind::ConnectionRefused;
        }
        false
    })
}

/// The error and its sources, outermost first. An `io::Error` that wraps another error
/// is followed into it: its `source()` skips what it wraps (it answers the wrapped
/// error's own source), and hyper-rustls wraps tokio-rustls' `InvalidData` error in a
/// second `io::Error`.
fn chain<'a>(error: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&error| {
        match error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            Some(wrapped) => Some(wrapped as &(dyn Error + 'static)),
            None => error.source(),
        }
    })
}

/// `429`, `503` or `529`: the statuses by which an upstream says it has too much work.
/// Read by an adaptive limit.
pub(crate) fn is_overload_status(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 503 | 529)
}

/// Whether `error` is the upstream saying it is overloaded: an HTTP/2 `REFUSED_STREAM`
/// or `ENHANCE_YOUR_CALM` (its 429) anywhere in the chain. Read by an adaptive limit.
pub(crate) fn is_overload(error: &(dyn Error + 'static)) -> bool {
    chain(error).any(reasons::overload)
}

/// What hyper's, h2's and hyper-util's errors say (feature `hyper-errors`). Without the
/// feature they say nothing, and only `io::Error` kinds are read.
#[cfg(feature = "hyper-errors")]
mod reasons {
    use std::error::Error;

    /// hyper-util's legacy client failed to connect: nothing of the request was sent.
    pub(super) fn is_connect_error(error: &(dyn Error + 'static)) -> bool {
        error
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
    }

    /// Whether an h2 or hyper error proves the upstream did no processing; `None` for
    /// another error.
    pub(super) fn unprocessed(error: &(dyn Error + 'static)) -> Option<bool> {
        if let Some(error) = error.downcast_ref::<h2::Error>() {
            return Some(
                error.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (error.is_go_away() && error.is_remote()),
            );
        }
        // hyper also cancels a request whose connection task was dropped with the
        // runtime, sent or not; a runtime that is going away retries nothing.
        let error = error.downcast_ref::<hyper::Error>()?;
        Some(error.is_canceled())
    }

    /// An h2 error by which the server refuses more work.
    pub(super) fn overload(error: &(dyn Error + 'static)) -> bool {
        error.downcast_ref::<h2::Error>().is_some_and(|error| {
            matches!(
                error.reason(),
                Some(h2::Reason::REFUSED_STREAM | h2::Reason::ENHANCE_YOUR_CALM)
            )
        })
    }

    /// Whether an h2 or hyper error is transient; `None` for another error.
    pub(super) fn transient(error: &(dyn Error + 'static)) -> Option<bool> {
        if let Some(error) = error.downcast_ref::<h2::Error>() {
            let reset_by_server = error.is_reset()
                && error.is_remote()
                && matches!(
                    error.reason(),
                    Some(
                        h2::Reason::INTERNAL_ERROR
                            | h2::Reason::CANCEL
                            | h2::Reason::ENHANCE_YOUR_CALM
                    )
                );
            return Some(
                error.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (error.is_go_away() && error.is_remote())
                    || reset_by_server,
            );
        }
        let error = error.downcast_ref::<hyper::Error>()?;
        Some(error.is_incomplete_message() || error.is_canceled() || error.is_closed())
    }
}

#[cfg(not(feature = "hyper-errors"))]
mod reasons {
    use std::error::Error;

    pub(super) fn is_connect_error(_: &(dyn Error + 'static)) -> bool {
        false
    }

    pub(super) fn unprocessed(_: &(dyn Error + 'static)) -> Option<bool> {
        None
    }

    pub(super) fn transient(_: &(dyn Error + 'static)) -> Option<bool> {
        None
    }

    pub(super) fn overload(_: &(dyn Error + 'static)) -> bool {
        false
    }
}

/// A cause of a connect failure that the next attempt would meet again: TLS, name
/// resolution, an invalid URI.
fn repeats_on_retry(error: &(dyn Error + 'static)) -> bool {
    if let Some(error) = error.downcast_ref::<io::Error>() {
        if error.kind() == io::ErrorKind::InvalidData {
            return true;
        }
    }
    // From here on, text: hyper-util's `ConnectError` is private, and native-tls
    // errors are opaque. Only errors inside a connect error are read, so the words
    // cannot come from a response.
    let text = error.to_string();
    if text == "dns error" || text.starts_with("invalid URL") {
        return true;
    }
    let text = text.to_ascii_lowercase();
    text.contains("certificate") || text.contains("handshake")
}

fn is_transient_itself(error: &(dyn Error + 'static)) -> bool {
    if let Some(transient) = reasons::transient(error) {
        return transient;
    }
    if let Some(error) = error.downcast_ref::<io::Error>() {
        return matches!(
            error.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        );
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct Wrapped(Box<dyn Error + Send + Sync>);
    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn io_kinds() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
        ] {
            assert!(is_transient(&io::Error::from(kind)), "{kind:?}");
        }
        for kind in [io::ErrorKind::InvalidData, io::ErrorKind::PermissionDenied] {
            assert!(!is_transient(&io::Error::from(kind)), "{kind:?}");
        }
    }

    #[test]
    fn walks_the_source_chain() {
        let deep = Wrapped(Box::new(Wrapped(Box::new(io::Error::from(
            io::ErrorKind::ConnectionReset,
        )))));
        assert!(is_transient(&deep));
        let other = Wrapped(Box::new(io::Error::other("tls handshake failed")));
        assert!(!is_transient(&other));
    }

    #[test]
    fn causes_of_a_connect_failure_that_a_retry_repeats() {
        // The client's own connect errors cannot be made here: the loopback tests
        // (`tests/faults.rs`) put these causes inside them.
        let repeats = |error: &(dyn Error + 'static)| chain(error).any(repeats_on_retry);
        assert!(repeats(&io::Error::from(io::ErrorKind::InvalidData)));
        assert!(repeats(&Wrapped(Box::new(io::Error::other(
            "SSL routines::certificate verify failed"
        )))));
        assert!(repeats(&io::Error::other("TLS Handshake failed")));
        assert!(repeats(&Wrapped(Box::from("dns error"))));
        assert!(repeats(&Wrapped(Box::from("invalid URL, host is missing"))));
        // As hyper-rustls reports a failed handshake: tokio-rustls' `InvalidData` inside
        // another `io::Error`, whose `source()` alone would skip it.
        let alert = io::Error::new(io::ErrorKind::InvalidData, "received fatal alert");
        assert!(repeats(&Wrapped(Box::new(io::Error::other(alert)))));
        for error in [
            io::Error::from(io::ErrorKind::ConnectionRefused),
            io::Error::from(io::ErrorKind::TimedOut),
            io::Error::other("tcp connect error"),
            // Only hyper-util's exact wording counts.
            io::Error::other("the dns error page"),
        ] {
            assert!(!repeats(&error), "{error}");
        }
    }

    #[cfg(feature = "hyper-errors")]
    #[test]
    fn what_proves_the_upstream_did_no_processing() {
        assert!(is_unprocessed(&io::Error::from(
            io::ErrorKind::ConnectionRefused
        )));
        assert!(is_unprocessed(&Wrapped(Box::new(h2::Error::from(
            h2::Reason::REFUSED_STREAM
        )))));
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::TimedOut,
        ] {
            assert!(!is_unprocessed(&io::Error::from(kind)), "{kind:?}");
        }
        assert!(!is_unprocessed(&h2::Error::from(
            h2::Reason::INTERNAL_ERROR
        )));
        assert!(!is_unprocessed(&h2::Error::from(h2::Reason::CANCEL)));
    }

    /// A request on a connection whose task is gone: hyper cancels it unsent.
    #[cfg(feature = "hyper-errors")]
    #[tokio::test]
    async fn a_request_hyper_cancelled_before_sending_was_not_processed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let io = hyper_util::rt::TokioIo::new(tcp);
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, String>(io)
            .await
            .unwrap();
        drop(connection);
        let error = sender
            .send_request(http::Request::new(String::new()))
            .await
            .unwrap_err();
        assert!(error.is_canceled(), "{error:?}");
        assert!(is_unprocessed(&error));
        assert!(is_transient(&error));
    }

    #[cfg(feature = "hyper-errors")]
    #[test]
    fn h2_refused_stream_is_transient_wherever_it_comes_from() {
        assert!(is_transient(&h2::Error::from(h2::Reason::REFUSED_STREAM)));
        // Other reasons count only when the server reset the stream (h2 exposes no
        // constructor for remote errors: the loopback tests cover those).
        assert!(!is_transient(&h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert!(!is_transient(&h2::Error::from(h2::Reason::PROTOCOL_ERROR)));
    }
}
