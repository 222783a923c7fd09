//! The three layers over a hyper-util client, as the README's quick start builds
//! them, against a mock SSE upstream on 127.0.0.1 that fails on purpose, printing what
//! happened to each call.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! 1. A 503 and then a reset before the first event: both retried, the call succeeds
//!    on its third attempt.
//! 2. A stall before the first event: retried after `first_chunk_timeout`.
//! 3. A reset after two events: the caller has them already, so it is not retried and
//!    the caller gets a body error.
//! 4. Four calls at once with room for two: two stream, two are rejected at the limit
//!    after `max_wait`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::{
    FirstChunkRetryLayer, Rejected, RetryBudget, RetryBudgetLayer, RetryPolicy,
    StreamConcurrencyLayer,
};
use tower_stream_backpressure_testkit::{Fault, Reply, Upstream};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The upstream answers each request by its number: 0 to 5 misbehave.
    let upstream = Upstream::start(|hit| match hit.index {
        0 => Reply::status(503).header("retry-after", "0"),
        1 => Reply::faulty(5, Fault::ResetBeforeFirst),
        3 => Reply::faulty(5, Fault::StallBeforeFirst),
        5 => Reply::faulty(5, Fault::ResetAfter(2)).gap(Duration::from_millis(10)),
        _ => Reply::tokens(5).gap(Duration::from_millis(40)),
    })
    .await;
    let url = upstream.url("/v1/chat/completions");

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let hyper_util_client =
        Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);

    let policy = RetryPolicy::default()
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .first_chunk_timeout(Duration::from_millis(300));
    let client = ServiceBuilder::new()
        .layer(StreamConcurrencyLayer::new(2).max_wait(Duration::from_millis(50)))
        .layer(RetryBudgetLayer::new(RetryBudget::default()))
        .layer(FirstChunkRetryLayer::new(policy))
        .service(hyper_util_client);

    for (call, what) in ["a 503, then a reset", "a stall", "a reset after two events"]
        .iter()
        .enumerate()
    {
        let hits = upstream.hits();
        let result = stream(client.clone(), &url).await;
        let attempts = upstream.hits() - hits;
        println!(
            "call {} ({what}): {attempts} attempt(s), {}",
            call + 1,
            describe(&result)
        );
    }

    println!("4 calls at once, limit 2, max wait 50 ms:");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { stream(client, &url).await })
        })
        .collect();
    for call in calls {
        println!("  {}", describe(&call.await?));
    }
    println!(
        "the upstream saw {} requests, at most {} streams at once",
        upstream.hits(),
        upstream.peak_streams()
    );
    Ok(())
}

/// Makes one streaming call and reads it to the end: the events it got, or the error
/// and the events that came before it.
async fn stream<S, B>(client: S, url: &str) -> Result<usize, (usize, BoxError)>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>, Error = BoxError>,
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>>,
{
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .expect("a valid request");
    // Resolves at the first event, after any retries; a `Rejected` if no slot is free.
    let response = client.oneshot(request).await.map_err(|e| (0, e))?;
    let mut body = std::pin::pin!(response.into_body());
    let mut events = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (events, e.into()))?;
        if let Some(data) = frame.data_ref() {
            events += data.windows(2).filter(|w| w == b"\n\n").count();
        }
    }
    // The slot was released when the body ended.
    Ok(events)
}

fn describe(result: &Result<usize, (usize, BoxError)>) -> String {
    match result {
        Ok(events) => format!("ok, {events} events"),
        Err((_, error)) if error.is::<Rejected>() => format!("rejected at the limit: {error}"),
        Err((events, error)) => format!("failed after {events} events: {error}"),
    }
}
