use std::error::Error;
use std::io;

/// The default error classifier: whether an error from the inner service is transient
/// and safe to retry for a request that has not produced a first chunk.
///
/// Walks the error and its [`source`](Error::source) chain, and returns `true` for:
/// - a connect failure (hyper-util's legacy client `Error::is_connect`: nothing was
///   sent);
/// - an HTTP/2 `REFUSED_STREAM` (the server did no processing, RFC 9113 §8.7), a
///   GOAWAY sent by the server (the stream was not processed or the connection went
///   away), or a stream the server reset with `INTERNAL_ERROR` or `CANCEL` (HTTP/2's
///   connection reset) or `ENHANCE_YOUR_CALM` (its 429);
/// - I/O errors `ConnectionRefused`, `ConnectionReset`, `ConnectionAborted`,
///   `BrokenPipe`, `UnexpectedEof`;
/// - hyper errors for a connection that closed before the response completed
///   (`is_incomplete_message`, `is_canceled`, `is_closed`).
///
/// Everything else (a malformed request, a TLS failure, a body that could not be
/// sent) is not retried. Compose it with your own rules through
/// [`RetryPolicy::classify_errors`](super::RetryPolicy::classify_errors).
///
/// ```
/// use std::io;
/// use tower_stream_backpressure::retry::is_transient;
///
/// assert!(is_transient(&io::Error::from(io::ErrorKind::ConnectionReset)));
/// assert!(!is_transient(&io::Error::from(io::ErrorKind::PermissionDenied)));
/// ```
pub fn is_transient(error: &(dyn Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if is_transient_itself(error) {
            return true;
        }
        next = error.source();
    }
    false
}

fn is_transient_itself(error: &(dyn Error + 'static)) -> bool {
    if let Some(error) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
        return error.is_connect();
    }
    if let Some(error) = error.downcast_ref::<h2::Error>() {
        let reset_by_server = error.is_reset()
            && error.is_remote()
            && matches!(
                error.reason(),
                Some(
                    h2::Reason::INTERNAL_ERROR | h2::Reason::CANCEL | h2::Reason::ENHANCE_YOUR_CALM
                )
            );
        return error.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (error.is_go_away() && error.is_remote())
            || reset_by_server;
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
    if let Some(error) = error.downcast_ref::<hyper::Error>() {
        return error.is_incomplete_message() || error.is_canceled() || error.is_closed();
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
    fn h2_refused_stream_is_transient_wherever_it_comes_from() {
        assert!(is_transient(&h2::Error::from(h2::Reason::REFUSED_STREAM)));
        // Other reasons count only when the server reset the stream (h2 exposes no
        // constructor for remote errors: the loopback tests cover those).
        assert!(!is_transient(&h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert!(!is_transient(&h2::Error::from(h2::Reason::PROTOCOL_ERROR)));
    }
}
