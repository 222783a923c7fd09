//! The whole stack from a configuration file (feature `serde`): YAML or JSON, read
//! with any serde format, one call to build the layers, then streaming calls through
//! them against a mock SSE upstream on 127.0.0.1.
//!
//! ```text
//! cargo run --features serde --example config                  # the configuration below
//! cargo run --features serde --example config -- stack.yaml    # or stack.yml, stack.json
//! ```
//!
//! The README's "Configuration from files" lists every field; each is optional. An
//! invalid one is reported with its full name, as the last lines show.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::config::Config;
use tower_stream_backpressure_testkit::{Reply, Upstream};

/// Used when no file is named.
const DEFAULT: &str = "\
stream_max_concurrent: 8
max_wait: 2s
first_chunk_timeout: 5s
stream_idle_timeout: 30s
frames: sse
stream_retry:
  max_attempts: 3
  initial_delay: 20ms
  max_delay: 200ms
  budget:
    ttl: 10s
    min_per_sec: 10
    retry_ratio: 0.2
";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The configuration: YAML, or JSON for a `.json` file.
    let config: Config = match std::env::args_os().nth(1) {
        None => serde_norway::from_str(DEFAULT)?,
        Some(path) => {
            let text = std::fs::read_to_string(&path)?;
            if path.to_string_lossy().ends_with(".json") {
                serde_json::from_str(&text)?
            } else {
                serde_norway::from_str(&text)?
            }
        }
    };

    // The layers, in the README's order, with `provider="openai"` on their metrics.
    let layers = config.layer("openai")?;
    match layers.concurrency() {
        Some(limit) => println!(
            "limit: {} streams, max wait {:?}",
            limit.limit(),
            limit.get_max_wait()
        ),
        None => println!("limit: none"),
    }
    let policy = layers.policy();
    println!(
        "retry: {} attempts, backoff {:?}, first chunk within {:?}",
        policy.get_max_attempts(),
        policy.get_backoff(),
        policy.get_first_chunk_timeout()
    );
    match layers.budget() {
        Some(budget) => println!(
            "budget: {} retries/s and {} per call over {:?}",
            budget.min_per_sec(),
            budget.retry_ratio(),
            budget.ttl()
        ),
        None => println!("budget: none"),
    }
    println!(
        "gap allowed between chunks: {:?}",
        layers.stream_idle_timeout()
    );

    // Every third request is answered 503 first, and retried.
    let upstream = Upstream::start(|hit| match hit.index % 3 {
        0 => Reply::status(503),
        _ => Reply::tokens(3).gap(Duration::from_millis(10)),
    })
    .await;
    let hyper_util_client =
        Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(HttpConnector::new());
    let client = ServiceBuilder::new()
        .layer(layers)
        .service(hyper_util_client);

    for call in 1..=3 {
        let request = http::Request::post(upstream.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))?;
        let response = client.clone().oneshot(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        println!("call {call}: {status}, {} bytes of SSE", body.len());
    }
    println!("the upstream saw {} requests for 3 calls", upstream.hits());

    // A mistake names the field in full.
    for text in [
        r#"{"stream_retry": {"max_attempts": "many"}}"#,
        r#"{"stream_retry": {"initial_delay": "5s"}}"#,
    ] {
        match serde_json::from_str::<Config>(text)
            .map_err(BoxError::from)
            .and_then(|c| Ok(c.layer("openai")?))
        {
            Ok(_) => println!("{text}: accepted"),
            Err(error) => println!("{text}: {error}"),
        }
    }
    Ok(())
}
