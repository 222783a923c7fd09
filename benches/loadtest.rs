//! An end-to-end load test: 10,000 concurrent SSE streams over real sockets, through a
//! bare hyper-util client, through the three layers, and through what a user would
//! stack instead (tower's limit and retry, tower-http's body timeout), to measure what
//! the layers cost in throughput and in memory per open stream, and to check that the
//! concurrency limit holds at the server.
//!
//! ```text
//! cargo bench --bench loadtest                     # the defaults, about 2 minutes
//! cargo bench --bench loadtest -- --streams 1000   # a quick run
//! cargo bench --bench loadtest -- --phase throughput --configs bare,concurrency,budget,retry
//! cargo bench --bench loadtest -- --help
//! ```
//!
//! # Why
//!
//! A middleware that wraps every response body is on the path of every event of every
//! stream, and its state lives as long as the stream. Micro-benchmarks show one call;
//! this shows the cost where it matters: ten thousand streams open at once, real
//! HTTP/1.1 and HTTP/2 connections on loopback, a real hyper server, and the client's
//! memory as the kernel counts it.
//!
//! # What it runs
//!
//! Each stream is `200 text/event-stream`: 20 content events and `data: [DONE]` (21
//! SSE events, the bytes of the shared mock upstream's `token_events`), each sent after
//! a pause (the gap). The client is a hyper-util client (TCP_NODELAY; `http2_only(true)`
//! for HTTP/2 with prior knowledge, h2c), in these configurations (the name in
//! `--configs` and `--run` first, where it differs from the tables'):
//!
//! - **bare**: the hyper-util client alone;
//! - **stack**: the three layers in the README's order, default settings:
//!   `StreamConcurrencyLayer::new(N)` (a limit no run reaches), `RetryBudgetLayer` with
//!   `RetryBudget::default()`, `FirstChunkRetryLayer` with `RetryPolicy::default()` and
//!   the `Auto` detector;
//! - `limit`, **stack+limit**: the same with `StreamConcurrencyLayer::new(--limit)`, no
//!   `max_wait`;
//! - **tower**: what tower offers for the same job, the testkit's
//!   `contenders::tower_stack`: `ConcurrencyLimit::new(N)` (never reached; released at
//!   the response headers, not the end of the body) over `Retry` with a `TpsBudget` and
//!   a one-line policy (errors and 5xx retried while the budget allows; every request
//!   cloned before it is sent);
//! - **tower-http**: tower-http's `ResponseBodyTimeout` (30 s, never reached), the
//!   usual body wrapper on a streaming client: a timer armed and reset around every
//!   frame (`contenders::tower_http_body_timeout`);
//! - **concurrency**, **budget**, **retry**: each of our layers alone, set as in
//!   **stack**.
//!
//! The memory phase runs bare, stack and stack+limit; the throughput phase runs the
//! configurations of `--configs` (bare, stack, limit, tower, tower-http unless told
//! otherwise). No configuration boxes its service or its body: each costs what it would
//! in an application.
//!
//! No OpenTelemetry meter provider is installed: the layers record to the no-op global
//! provider, as in an application that exports no metrics, so the figures are the
//! layers' own cost, not an exporter's.
//!
//! Every run has its own processes: this executable runs itself again as the server
//! (`--serve`: binds 127.0.0.1:0, prints its port, reports its counts when asked on
//! stdin, exits when stdin closes) and as the client (`--run`: prints one result line
//! per configuration). The parent only starts them and prints the tables. Separate processes keep the
//! memory figures clean (no allocator memory kept from an earlier run, no server in the
//! client's RSS) and give each side its own file-descriptor limit.
//!
//! The server is this benchmark's own small hyper server, not the shared mock upstream,
//! for one reason: the mock's listener has the usual accept queue of 128, and ten
//! thousand HTTP/1.1 connections opened at once overflow it: the kernel drops the
//! SYNs, the client sends them again one, three, seven seconds later, and the streams
//! never all overlap. This one asks for a queue of 65,535 (the kernel caps it at
//! `net.core.somaxconn`).
//!
//! Two phases, each over HTTP/1.1 and HTTP/2:
//!
//! - **memory**: one client process per configuration. After one warm-up call, the
//!   client's VmRSS is the baseline; then N tasks start, spread evenly over
//!   `--ramp-ms` (1 s), each making one call and reading its body to the end. With a
//!   `--gap-ms` of 150 ms a stream lasts about 3.2 s, so all N are open at once for
//!   about two seconds. A thread samples VmRSS every 10 ms, with the number of streams
//!   open (response received, body not yet ended) at that moment:
//!   `RSS per open stream = (RSS when the most streams were open - baseline) / that
//!   many streams`. `--ramp-ms 0` starts every task in the same instant; the figures
//!   then carry the transient of ten thousand requests in flight before any answer
//!   (tens of MiB over HTTP/2, which the allocator keeps), and vary by about 1 KiB per
//!   stream between two identical runs.
//! - **throughput**: gap 0, the server sends as fast as it can. One client process per
//!   protocol holds the configurations of `--configs` (each with its own hyper-util
//!   client and connection pool) and runs them in turns: a round is N streams,
//!   `--concurrency` (500) at a time, each task making calls one after the other. One
//!   round of each opens the connections and is not counted; then `--rounds` (10)
//!   rounds of each, the order rotating. Taking turns a fraction of a second apart puts
//!   them all under the same load from the rest of the machine, so their ratios hold
//!   even when their absolute figures move. At most 500 streams at a time, because the
//!   HTTP/2 client (the `h2` crate, 0.4) protects itself against many small DATA frames
//!   left unread: past about 2.5 MiB of framing overhead (half the connection window
//!   hyper sets) it closes the connection with `ENHANCE_YOUR_CALM`
//!   ("too_many_data_frames"), and 1,000 streams of short events sent with no gap can
//!   get there; 10,000 do.
//!
//! # File descriptors
//!
//! Over HTTP/1.1 every open stream is a connection: N sockets in the client process and
//! N in the server process. Each process needs `ulimit -n` of at least N + 200;
//! `ulimit -n 20000` covers the default of 10,000. The benchmark checks the limit at the
//! start and says what to do when it is too low; it does not raise it itself.
//!
//! # Reading the output
//!
//! Progress goes to stderr, the tables to stdout.
//!
//! - **memory**: `wall s` from the first call to the last body's end; `events/s` there
//!   is set by the gap. `base`, `peak`: the client's VmRSS after the warm-up call and
//!   its peak; `open`: the most streams open in one sample, `open MiB` the VmRSS then;
//!   `B/open str`: RSS per open stream in bytes, everything a stream costs the client
//!   (its task, the connection's share, hyper's and the layers' state); `task B`: the
//!   size of one task's future, part of that; `srv peak`: the server's peak concurrent
//!   streams; `acc drop`: connections dropped by a full accept queue during the run
//!   (the machine's `ListenOverflows`, so other programs' too), each delaying a stream
//!   by a second or more. The stack+limit row is not comparable with the others: its
//!   RSS also carries the calls waiting for a slot.
//! - **throughput**: the median round by events/s of each configuration of
//!   `--configs`, and the range over the rounds; `srv peak` is for all of them
//!   together.
//! - **limit check**: the server's peak concurrent streams in the memory phase must
//!   equal `min(--limit, N)`: `OK`, else `MISMATCH`.
//! - **what the stack costs**: `events/s X / bare` for each configuration X of
//!   `--configs` but bare, the median of the per-turn ratios and their middle half
//!   (first to third quartile), throughput phase. For stack the goal is at least 0.97.
//!   `stack+limit / bare` is the same stack again (with `--concurrency` below `--limit`
//!   no call waits): how far it is from `stack / bare` shows the noise. With tower
//!   listed, `stack / tower` too: ours against what a user would pick instead. Then
//!   `extra RSS per open stream`, stack minus bare (memory phase; goal at most 512 bytes).
//!
//! The exit status is non-zero if a run failed, a stream failed, or the limit check
//! did not hold.
//!
//! # Profiling
//!
//! The two sides also run on their own, so that one can run the client under a
//! profiler against a server in another shell. Build, and take the executable's path
//! from cargo's `Executable` line:
//!
//! ```text
//! cargo bench --no-run --bench loadtest
//! #   Executable benches/loadtest.rs (target/release/deps/loadtest-<hash>)
//! ```
//!
//! In one shell, the server, with no gap between events as in the throughput phase
//! (`--serve` alone keeps the memory phase's 150 ms); it prints `port=<port>`, answers
//! a `stats` line on stdin with its counts, and exits at end of input (Ctrl-D):
//!
//! ```text
//! target/release/deps/loadtest-<hash> --serve --gap-ms 0
//! ```
//!
//! (In a script, keep its stdin open: `sleep infinity | loadtest-<hash> --serve
//! --gap-ms 0 &`, and end the `sleep` to stop the server.)
//!
//! In another, the client under callgrind, one configuration at a time (only the listed
//! configurations are built, so the profile holds no other's setup), with that port:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=stack.callgrind \
//!     target/release/deps/loadtest-<hash> --run throughput --proto h1 --port <port> \
//!     --configs stack --rounds 2 --streams 2000 --concurrency 100
//! ```
//!
//! It prints one result line, `result config=stack ... streams_made=6000`: the streams
//! the process made in all, the uncounted round that opens the connections included
//! (`(--rounds + 1) * --streams` when none fails). Callgrind is some 50 times slower than
//! the program alone; a round still running after `--timeout-s` (300 s) is cut short,
//! so raise it for large runs. Then, per stream:
//!
//! - instructions: the total (`Collected :` in valgrind's last lines, or the `totals:`
//!   line of the file: `grep ^totals: stack.callgrind`) divided by `streams_made`;
//! - allocations: the calls to `malloc` (every thread's, in the one file) divided by
//!   `streams_made`; callgrind_annotate lists them by caller, or this sums them:
//!
//! ```text
//! awk '/^c?fn=\([0-9]+\) / { name[substr($1, index($1, "("))] = substr($0, index($0, ") ") + 2) }
//!      /^cfn=/ { called = name[substr($1, 5)] }
//!      /^calls=/ && called == "malloc" { n += substr($1, 7) }
//!      END { print n }' stack.callgrind
//! ```
//!
//! Both totals also hold what is done once (the runtime, the client, the first
//! connections: a few million instructions and some hundreds of allocations, a few per
//! cent of a run of 1,000 streams). Two runs that differ only in `--rounds` cancel it:
//! `(total(3 rounds) - total(1 round)) / (streams_made(3) - streams_made(1))` is the
//! cost of one more stream alone. Compare configurations at the same `--proto`,
//! `--streams` and `--concurrency`, each in its own run.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tower_stream_backpressure_testkit::flags::{self, next_flag, value};
use tower_stream_backpressure_testkit::process::{error_chain, rss_bytes};
use tower_stream_backpressure_testkit::{contenders, upstream};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::task::JoinSet;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_stream_backpressure::{
    FirstChunkRetryLayer, RetryBudget, RetryBudgetLayer, RetryPolicy, StreamConcurrencyLayer,
};

/// Content events per stream.
const TOKENS: usize = 20;
/// SSE events per stream: the content events and `data: [DONE]`.
const EVENTS: u64 = TOKENS as u64 + 1;
/// File descriptors a process needs beyond one per HTTP/1.1 stream.
const FD_MARGIN: u64 = 200;
/// The server's accept queue (the kernel caps it at `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 65_535;
/// The path of the warm-up call, answered without a gap.
const WARM_UP: &str = "/warm-up";
/// How often the client samples its RSS.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

const HELP: &str = "\
End-to-end load test: N concurrent SSE streams on loopback, through a bare
hyper-util client and through StreamConcurrencyLayer, RetryBudgetLayer and
FirstChunkRetryLayer, over HTTP/1.1 and HTTP/2 (h2c), beside what a user would
stack instead (tower's limit and retry, tower-http's body timeout). Reports
streams/s, events/s, the client's peak RSS and RSS per open stream, and the
server's peak concurrent streams, in two phases: memory (a gap between events,
all N streams open at once; bare, stack, limit) and throughput (no gap, the
configurations of --configs taking turns).

Usage: cargo bench --bench loadtest -- [FLAGS]

Flags (default in brackets):
  --streams N        streams per run (memory: all open at once) [10000]
  --limit N          the limit of the stack+limit runs [1000]
  --gap-ms MS        memory phase: pause before each event [150]
  --ramp-ms MS       memory phase: the N calls start evenly over MS, 0 for all
                     in the same instant [1000]
  --concurrency N    throughput phase: streams at a time [500]
  --rounds N         throughput phase: rounds of N streams per configuration,
                     after one uncounted round that opens the connections [10]
  --configs LIST     throughput phase: the configurations, comma-separated
                     [bare,stack,limit,tower,tower-http]; any of
                       bare         the hyper-util client alone
                       stack        our three layers, a limit never reached
                       limit        our three layers, --limit (stack+limit)
                       tower        tower's ConcurrencyLimit + Retry, TpsBudget
                       tower-http   tower-http's ResponseBodyTimeout, 30 s
                       concurrency  StreamConcurrencyLayer alone
                       budget       RetryBudgetLayer alone
                       retry        FirstChunkRetryLayer alone
  --phase PHASE      memory, throughput or both [both]
  --proto PROTO      h1, h2 or both [both]
  --timeout-s S      a round still running after S seconds is cut short and
                     its unfinished streams count as failed [300]
  -h, --help         print this help

Each process needs `ulimit -n` of at least N + 200 (HTTP/1.1 opens one
connection per open stream): `ulimit -n 20000` covers the default.

Used by the benchmark itself, in the processes it starts, and by hand to
profile one side (see Profiling in the benchmark's documentation):
  --serve            serve SSE streams on 127.0.0.1 (--gap-ms between events:
                     0 for throughput), print `port=<port>`, answer `stats`
                     on stdin, exit when stdin closes
  --run RUN          the client: one configuration, named as in --configs
                     (a memory run), or throughput (those of --configs in
                     turns); needs --port and one --proto; prints result
                     lines, with streams_made (the uncounted calls included)
  --port PORT        the server's port, for --run
";

/// A client configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    /// The hyper-util client alone.
    Bare,
    /// The three layers, with a limit no run reaches.
    Stack,
    /// The three layers, with `--limit`.
    Limit,
    /// tower's `ConcurrencyLimit` (a limit no run reaches) and `Retry` with a
    /// `TpsBudget`: the testkit's `contenders::tower_stack`.
    Tower,
    /// tower-http's `ResponseBodyTimeout` (30 s, never reached): the testkit's
    /// `contenders::tower_http_body_timeout`.
    TowerHttp,
    /// `StreamConcurrencyLayer` alone, with a limit no run reaches.
    Concurrency,
    /// `RetryBudgetLayer` alone, `RetryBudget::default()`.
    Budget,
    /// `FirstChunkRetryLayer` alone, `RetryPolicy::default()`.
    Retry,
}

impl Config {
    const ALL: [Config; 8] = [
        Config::Bare,
        Config::Stack,
        Config::Limit,
        Config::Tower,
        Config::TowerHttp,
        Config::Concurrency,
        Config::Budget,
        Config::Retry,
    ];
    /// The memory phase's configurations.
    const MEMORY: [Config; 3] = [Config::Bare, Config::Stack, Config::Limit];
    /// The throughput phase's configurations unless `--configs` says otherwise.
    const THROUGHPUT: [Config; 5] = [
        Config::Bare,
        Config::Stack,
        Config::Limit,
        Config::Tower,
        Config::TowerHttp,
    ];

    /// The name in `--run` and `--configs`, and the `config=` of a result line.
    fn flag(self) -> &'static str {
        match self {
            Config::Bare => "bare",
            Config::Stack => "stack",
            Config::Limit => "limit",
            Config::Tower => "tower",
            Config::TowerHttp => "tower-http",
            Config::Concurrency => "concurrency",
            Config::Budget => "budget",
            Config::Retry => "retry",
        }
    }

    /// The name in the tables.
    fn name(self) -> &'static str {
        match self {
            Config::Limit => "stack+limit",
            other => other.flag(),
        }
    }

    /// What it is, in a few words, for the ratios.
    fn about(self) -> &'static str {
        match self {
            Config::Bare => "the hyper-util client alone",
            Config::Stack => "our three layers",
            Config::Limit => "our three layers, --limit",
            Config::Tower => "tower's ConcurrencyLimit + Retry with a TpsBudget",
            Config::TowerHttp => "tower-http's ResponseBodyTimeout",
            Config::Concurrency => "StreamConcurrencyLayer alone",
            Config::Budget => "RetryBudgetLayer alone",
            Config::Retry => "FirstChunkRetryLayer alone",
        }
    }

    /// The configuration named `flag`.
    fn from_flag(flag: &str) -> Option<Config> {
        Config::ALL.into_iter().find(|config| config.flag() == flag)
    }

    /// Every configuration's flag, for messages.
    fn flags() -> String {
        Config::ALL.map(Config::flag).join(", ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    /// HTTP/2 with prior knowledge: every stream on one connection.
    Http2,
}

impl Proto {
    fn flag(self) -> &'static str {
        match self {
            Proto::Http1 => "h1",
            Proto::Http2 => "h2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A gap between events, all streams open at once, RSS measured.
    Memory,
    /// No gap, the configurations taking turns, events/s measured.
    Throughput,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Memory => "memory",
            Phase::Throughput => "throughput",
        }
    }
}

/// What a client process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Memory(Config),
    Throughput,
}

/// The settings, from the command line.
#[derive(Debug)]
struct Args {
    streams: usize,
    limit: usize,
    gap: Duration,
    ramp: Duration,
    concurrency: usize,
    rounds: usize,
    /// The throughput phase's configurations, in their first turn's order.
    configs: Vec<Config>,
    phases: Vec<Phase>,
    protos: Vec<Proto>,
    timeout: Duration,
    serve: bool,
    run: Option<Run>,
    port: u16,
}

impl Args {
    /// The flags, `Ok(None)` for `--help`, or an error naming the flag at fault.
    fn parse() -> Result<Option<Self>, String> {
        let mut args = Args {
            streams: 10_000,
            limit: 1000,
            gap: Duration::from_millis(150),
            ramp: Duration::from_millis(1000),
            concurrency: 500,
            rounds: 10,
            configs: Config::THROUGHPUT.to_vec(),
            phases: vec![Phase::Memory, Phase::Throughput],
            protos: vec![Proto::Http1, Proto::Http2],
            timeout: Duration::from_secs(300),
            serve: false,
            run: None,
            port: 0,
        };
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = next_flag(&mut parser)? {
            let p = &mut parser;
            let millis = |ms| Duration::from_millis(ms);
            match flag.as_str() {
                "--streams" => args.streams = value(p, &flag, 1, 1_000_000)?,
                "--limit" => args.limit = value(p, &flag, 1, 1_000_000)?,
                "--gap-ms" => args.gap = millis(value(p, &flag, 0, 60_000)?),
                "--ramp-ms" => args.ramp = millis(value(p, &flag, 0, 600_000)?),
                "--concurrency" => args.concurrency = value(p, &flag, 1, 1_000_000)?,
                "--rounds" => args.rounds = value(p, &flag, 1, 1000)?,
                "--timeout-s" => args.timeout = Duration::from_secs(value(p, &flag, 1, 86_400)?),
                "--port" => args.port = value(p, &flag, 1, 65_535)?,
                "--phase" => {
                    args.phases = match word(p)?.as_str() {
                        "memory" => vec![Phase::Memory],
                        "throughput" => vec![Phase::Throughput],
                        "both" => vec![Phase::Memory, Phase::Throughput],
                        other => {
                            return Err(format!(
                                "--phase: {other:?} is not one of memory, throughput, both"
                            ));
                        }
                    }
                }
                "--proto" => {
                    args.protos = match word(p)?.as_str() {
                        "h1" => vec![Proto::Http1],
                        "h2" => vec![Proto::Http2],
                        "both" => vec![Proto::Http1, Proto::Http2],
                        other => {
                            return Err(format!("--proto: {other:?} is not one of h1, h2, both"));
                        }
                    }
                }
                "--configs" => args.configs = configs(&word(p)?)?,
                "--serve" => args.serve = true,
                "--run" => {
                    let name = word(p)?;
                    args.run = match (Config::from_flag(&name), name.as_str()) {
                        (Some(config), _) => Some(Run::Memory(config)),
                        (None, "throughput") => Some(Run::Throughput),
                        _ => {
                            return Err(format!(
                                "--run: {name:?} is not one of {}, throughput",
                                Config::flags()
                            ));
                        }
                    };
                }
                "--help" => return Ok(None),
                // What `cargo bench` passes to every benchmark.
                "--bench" => {}
                _ => return Err(format!("invalid option '{flag}'")),
            }
        }
        if args.run.is_some() && (args.port == 0 || args.protos.len() != 1) {
            return Err("--run needs --port and one --proto".into());
        }
        Ok(Some(args))
    }
}

/// The value of `--configs`: configuration names, comma-separated, each once.
fn configs(list: &str) -> Result<Vec<Config>, String> {
    let mut configs = Vec::new();
    for name in list.split(',').map(str::trim) {
        let config = Config::from_flag(name)
            .ok_or_else(|| format!("--configs: {name:?} is not one of {}", Config::flags()))?;
        if configs.contains(&config) {
            return Err(format!("--configs: {name} is listed twice"));
        }
        configs.push(config);
    }
    Ok(configs)
}

/// The value of a flag that takes a word.
fn word(parser: &mut lexopt::Parser) -> Result<String, String> {
    let value = parser.value().map_err(|e| e.to_string())?;
    Ok(value.to_string_lossy().into_owned())
}

fn main() -> ExitCode {
    let args = flags::parse_or_exit("loadtest", HELP, Args::parse);
    if args.serve {
        serve(args.gap)
    } else if let Some(run) = args.run {
        run_client(run, &args)
    } else {
        parent(&args)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------
// The server process.

/// Serves SSE streams until stdin closes: prints `port=<port>`, then answers each
/// `stats` line with `peak=<n> hits=<n> completed=<n> open=<n>`.
fn serve(gap: Duration) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(message) => {
            eprintln!("loadtest server: {message}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match listen() {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("loadtest server: cannot listen on 127.0.0.1: {error}");
                return ExitCode::FAILURE;
            }
        };
        let port = listener.local_addr().map_or(0, |addr| addr.port());
        let counts = Arc::new(ServerCounts::default());
        let events: Arc<[Bytes]> = upstream::token_events(TOKENS).into();
        let server = tokio::spawn(accept(listener, counts.clone(), events, gap));
        println!("port={port}");
        let _ = std::io::stdout().flush();
        let commands = tokio::task::spawn_blocking(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "stats" {
                    println!(
                        "peak={} hits={} completed={} open={}",
                        counts.peak.load(Relaxed),
                        counts.hits.load(Relaxed),
                        counts.completed.load(Relaxed),
                        counts.open.load(Relaxed)
                    );
                    let _ = std::io::stdout().flush();
                }
            }
        });
        let _ = commands.await;
        server.abort();
        ExitCode::SUCCESS
    })
}

/// A listener on 127.0.0.1, port chosen by the system, with a deep accept queue (see
/// the module documentation).
fn listen() -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(ACCEPT_BACKLOG)
}

/// The server's own counts.
#[derive(Debug, Default)]
struct ServerCounts {
    /// Requests received.
    hits: AtomicU64,
    /// Streams being sent: from the request until the body's last event (or its drop).
    open: AtomicU64,
    /// The most streams open at once.
    peak: AtomicU64,
    /// Streams sent to their end.
    completed: AtomicU64,
}

/// Accepts connections and serves HTTP/1.1 and HTTP/2 with prior knowledge on each,
/// with no cap on HTTP/2 streams.
async fn accept(
    listener: tokio::net::TcpListener,
    counts: Arc<ServerCounts>,
    events: Arc<[Bytes]>,
    gap: Duration,
) {
    let mut warned = false;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of file descriptors, most likely: say so once, let some close.
                if !std::mem::replace(&mut warned, true) {
                    eprintln!("loadtest server: accept failed: {error}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (counts, events) = (counts.clone(), events.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            answer(request, counts.clone(), events.clone(), gap)
        });
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(None);
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

/// `200 text/event-stream`, the events each after `gap`.
async fn answer(
    request: Request<Incoming>,
    counts: Arc<ServerCounts>,
    events: Arc<[Bytes]>,
    gap: Duration,
) -> Result<Response<SseBody>, std::convert::Infallible> {
    counts.hits.fetch_add(1, Relaxed);
    // The client's warm-up call need not wait.
    let gap = if request.uri().path() == WARM_UP {
        Duration::ZERO
    } else {
        gap
    };
    // Read the request body so that HTTP/1.1 can reuse the connection.
    let _ = request.into_body().collect().await;
    let open = counts.open.fetch_add(1, Relaxed) + 1;
    counts.peak.fetch_max(open, Relaxed);
    let body = SseBody {
        events,
        next: 0,
        gap,
        pause: None,
        counts: Some(counts),
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    Ok(response)
}

/// The server's response body: each event after a pause of `gap`.
struct SseBody {
    events: Arc<[Bytes]>,
    next: usize,
    gap: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts the stream open while `Some`.
    counts: Option<Arc<ServerCounts>>,
}

impl SseBody {
    /// Stops counting the stream as open; once.
    fn close(&mut self, completed: bool) {
        if let Some(counts) = self.counts.take() {
            counts.open.fetch_sub(1, Relaxed);
            if completed {
                counts.completed.fetch_add(1, Relaxed);
            }
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.close(false);
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(event) = this.events.get(this.next).cloned() else {
            this.close(true);
            return Poll::Ready(None);
        };
        if !this.gap.is_zero() {
            let pause = this
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.gap)));
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        this.next += 1;
        if this.next == this.events.len() {
            // Counted closed before the last event leaves, so that the client cannot
            // see the end (and start another stream) before the server does.
            this.close(true);
        }
        Poll::Ready(Some(Ok(Frame::data(event))))
    }

    fn is_end_stream(&self) -> bool {
        self.next == self.events.len()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.events.get(self.next..).unwrap_or_default();
        SizeHint::with_exact(rest.iter().map(|event| event.len() as u64).sum())
    }
}

// ---------------------------------------------------------------------------------
// The client process.

/// A hyper-util client as a user of the crate would build one.
fn client(proto: Proto, streams: usize) -> Client<HttpConnector, Full<Bytes>> {
    // TCP_NODELAY, as every streaming client should: small writes go out at once.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    // HTTP/1.1: one connection per open stream, kept for the next round. HTTP/2: one
    // connection carries every stream.
    builder.pool_max_idle_per_host(streams);
    builder.http2_only(proto == Proto::Http2);
    builder.build(connector)
}

/// The three layers in the README's order, with default settings and `limit`. No meter
/// provider is installed, so they record to the no-op global one.
macro_rules! stack {
    ($client:expr, $limit:expr) => {
        ServiceBuilder::new()
            .layer(StreamConcurrencyLayer::new($limit))
            .layer(RetryBudgetLayer::new(RetryBudget::default()))
            .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
            .service($client)
    };
}

/// The service of each configuration, built only when the run uses it (`None`
/// otherwise), each with its own hyper-util client and connection pool.
///
/// Each is its own type, none boxed: a boxed service or body would add an allocation
/// and a dynamic call to every call and every frame of every contender, and shrink the
/// differences this benchmark is there to show. [`Services::round`] and
/// [`Services::memory`] pick the field by the configuration and run the generic code
/// on it.
struct Services<Ba, St, Li, To, Th, Co, Bu, Re> {
    bare: Option<Ba>,
    stack: Option<St>,
    limit: Option<Li>,
    tower: Option<To>,
    tower_http: Option<Th>,
    concurrency: Option<Co>,
    budget: Option<Bu>,
    retry: Option<Re>,
}

/// The services of `configs`, over `proto`.
fn services(
    proto: Proto,
    args: &Args,
    configs: &[Config],
) -> Services<
    impl Streaming,
    impl Streaming,
    impl Streaming,
    impl Streaming,
    impl Streaming,
    impl Streaming,
    impl Streaming,
    impl Streaming,
> {
    let (streams, limit) = (args.streams, args.limit);
    let on = |config| configs.contains(&config);
    let client = || client(proto, streams);
    Services {
        bare: on(Config::Bare).then(client),
        stack: on(Config::Stack).then(|| stack!(client(), streams)),
        limit: on(Config::Limit).then(|| stack!(client(), limit)),
        tower: on(Config::Tower).then(|| contenders::tower_stack(client(), streams)),
        tower_http: on(Config::TowerHttp).then(|| contenders::tower_http_body_timeout(client())),
        concurrency: on(Config::Concurrency).then(|| {
            ServiceBuilder::new()
                .layer(StreamConcurrencyLayer::new(streams))
                .service(client())
        }),
        budget: on(Config::Budget).then(|| {
            ServiceBuilder::new()
                .layer(RetryBudgetLayer::new(RetryBudget::default()))
                .service(client())
        }),
        retry: on(Config::Retry).then(|| {
            ServiceBuilder::new()
                .layer(FirstChunkRetryLayer::new(RetryPolicy::default()))
                .service(client())
        }),
    }
}

/// `$run` with `$service` bound to the service of `$config`, which must have been
/// built.
macro_rules! with_service {
    ($services:expr, $config:expr, |$service:ident| $run:expr) => {{
        let services = $services;
        match $config {
            Config::Bare => with_service!(@ services.bare, $config, $service, $run),
            Config::Stack => with_service!(@ services.stack, $config, $service, $run),
            Config::Limit => with_service!(@ services.limit, $config, $service, $run),
            Config::Tower => with_service!(@ services.tower, $config, $service, $run),
            Config::TowerHttp => with_service!(@ services.tower_http, $config, $service, $run),
            Config::Concurrency => with_service!(@ services.concurrency, $config, $service, $run),
            Config::Budget => with_service!(@ services.budget, $config, $service, $run),
            Config::Retry => with_service!(@ services.retry, $config, $service, $run),
        }
    }};
    (@ $field:expr, $config:expr, $service:ident, $run:expr) => {
        match &$field {
            Some($service) => $run,
            None => unreachable!("{} was not built", $config.name()),
        }
    };
}

impl<Ba, St, Li, To, Th, Co, Bu, Re> Services<Ba, St, Li, To, Th, Co, Bu, Re>
where
    Ba: Streaming,
    St: Streaming,
    Li: Streaming,
    To: Streaming,
    Th: Streaming,
    Co: Streaming,
    Bu: Streaming,
    Re: Streaming,
{
    /// [`round`] through the service of `config`.
    async fn round(
        &self,
        config: Config,
        uri: &Uri,
        (streams, concurrency, ramp): (usize, usize, Duration),
        args: &Args,
        gauge: &Arc<Gauge>,
    ) -> (Round, Option<String>) {
        with_service!(self, config, |service| {
            round(service, uri, streams, concurrency, ramp, args, gauge).await
        })
    }

    /// [`memory`] through the service of `config`.
    async fn memory(&self, config: Config, uri: Uri, args: &Args) -> Result<Vec<String>, String> {
        with_service!(self, config, |service| memory(config, service, uri, args)
            .await)
    }

    /// The throughput run: the configurations of `--configs` take turns, one round
    /// each per turn, the order rotating; the first turn opens the connections and is
    /// not counted.
    async fn throughput(&self, uri: Uri, args: &Args) -> Result<Vec<String>, String> {
        let configs = &args.configs;
        let gauge = Arc::new(Gauge::default());
        let mut rounds = vec![Vec::new(); configs.len()];
        // Streams made by each, the uncounted turn's too.
        let mut made = vec![0; configs.len()];
        let mut first_error = None;
        let load = (args.streams, args.concurrency, Duration::ZERO);
        for turn in 0..=args.rounds {
            for i in 0..configs.len() {
                let which = (turn + i) % configs.len();
                let (round, error) = self.round(configs[which], &uri, load, args, &gauge).await;
                made[which] += round.ok + round.failed;
                if let Some(error) = error {
                    first_error.get_or_insert(error);
                }
                if turn > 0 {
                    rounds[which].push(round);
                }
            }
        }
        if let Some(error) = first_error {
            eprintln!("loadtest client: first failure: {error}");
        }
        Ok(configs
            .iter()
            .zip(rounds.iter().zip(made))
            .map(|(config, (rounds, made))| rounds_line(config.flag(), rounds, made))
            .collect())
    }
}

/// Runs the client side of one run and prints its result lines.
fn run_client(run: Run, args: &Args) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(message) => {
            eprintln!("loadtest client: {message}");
            return ExitCode::FAILURE;
        }
    };
    let proto = args.protos[0];
    let result = runtime.block_on(async {
        let uri: Uri = format!("http://127.0.0.1:{}/v1/chat/completions", args.port)
            .parse()
            .map_err(|e| format!("bad url: {e}"))?;
        match run {
            Run::Memory(config) => {
                services(proto, args, &[config])
                    .memory(config, uri, args)
                    .await
            }
            Run::Throughput => {
                let services = services(proto, args, &args.configs);
                services.throughput(uri, args).await
            }
        }
    });
    match result {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("loadtest client: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What a service must be for the load: a streaming client whose tasks can move
/// between threads.
trait Streaming:
    Service<
        Request<Full<Bytes>>,
        Response = Response<Self::Body>,
        Error = Self::Failure,
        Future = Self::Call,
    > + Clone
    + Send
    + 'static
{
    type Body: Body<Data = Bytes, Error = Self::BodyError> + Send + 'static;
    type BodyError: Into<BoxError>;
    type Failure: Into<BoxError>;
    type Call: Send;
}

impl<S, B> Streaming for S
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Body = B;
    type BodyError = B::Error;
    type Failure = S::Error;
    type Call = S::Future;
}

/// One round of N streams.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    wall: Duration,
    ok: usize,
    failed: usize,
    /// Events of the streams that completed.
    events: u64,
}

impl Round {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Streams open in the client: response received, body not yet ended.
#[derive(Default)]
struct Gauge {
    open: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    /// Counts a stream open until the guard drops.
    fn open(self: &Arc<Self>) -> OpenStream {
        let open = self.open.fetch_add(1, Relaxed) + 1;
        self.max.fetch_max(open, Relaxed);
        OpenStream(self.clone())
    }
}

struct OpenStream(Arc<Gauge>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// What the RSS sampler saw.
#[derive(Debug, Default, Clone, Copy)]
struct Sampled {
    peak_kib: u64,
    /// The most streams open in one sample.
    open: usize,
    /// The RSS in that sample (the largest, if several had that many open).
    open_kib: u64,
}

/// The memory run: a warm-up call, the baseline RSS, then one round of N streams with
/// `concurrency = N`, started over the ramp, while a thread samples the RSS.
async fn memory<S: Streaming>(
    config: Config,
    service: &S,
    uri: Uri,
    args: &Args,
) -> Result<Vec<String>, String> {
    let gauge = Arc::new(Gauge::default());
    // Opens the first connection (and, through the stack, builds its instruments).
    let warm_up = Uri::builder()
        .scheme("http")
        .authority(uri.authority().map_or("", |a| a.as_str()))
        .path_and_query(WARM_UP)
        .build()
        .map_err(|e| format!("bad url: {e}"))?;
    stream(&mut service.clone(), warm_up, &Arc::default())
        .await
        .map_err(|e| format!("the warm-up call failed: {e}"))?;
    let baseline_kib = rss_bytes().unwrap_or(0) / 1024;
    // Each task holds a future this big for its whole life.
    let task_bytes = std::mem::size_of_val(&worker(
        service.clone(),
        uri.clone(),
        gauge.clone(),
        Arc::default(),
        0,
        Arc::default(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, gauge) = (stop.clone(), gauge.clone());
        std::thread::spawn(move || {
            let mut sampled = Sampled::default();
            loop {
                let done = stop.load(Relaxed);
                let open = gauge.open.load(Relaxed);
                let rss = rss_bytes().unwrap_or(0) / 1024;
                sampled.peak_kib = sampled.peak_kib.max(rss);
                if (open, rss) > (sampled.open, sampled.open_kib) {
                    (sampled.open, sampled.open_kib) = (open, rss);
                }
                if done {
                    return sampled;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    let (round, error) = round(
        service,
        &uri,
        args.streams,
        args.streams,
        args.ramp,
        args,
        &gauge,
    )
    .await;
    stop.store(true, Relaxed);
    let sampled = sampler
        .join()
        .map_err(|_| "the RSS sampler panicked".to_owned())?;
    if let Some(error) = error {
        eprintln!("loadtest client: first failure: {error}");
    }
    // The warm-up call and the round.
    let made = 1 + round.ok + round.failed;
    Ok(vec![format!(
        "{} baseline_kib={baseline_kib} peak_kib={} open_kib={} open_sampled={} max_open={} \
         task_bytes={task_bytes}",
        rounds_line(config.flag(), &[round], made),
        sampled.peak_kib,
        sampled.open_kib,
        sampled.open,
        gauge.max.load(Relaxed),
    )])
}

/// `result config=<config> walls=.. oks=.. fails=.. events=.. streams_made=..`, lists
/// comma-separated; `streams_made` counts the uncounted calls too (the warm-up call, the
/// round that opens the connections): what a profile of the process divides by.
fn rounds_line(config: &str, rounds: &[Round], made: usize) -> String {
    let list = |f: &dyn Fn(&Round) -> String| rounds.iter().map(f).collect::<Vec<_>>().join(",");
    format!(
        "result config={config} walls={} oks={} fails={} events={} streams_made={made}",
        list(&|r| format!("{:.6}", r.wall.as_secs_f64())),
        list(&|r| r.ok.to_string()),
        list(&|r| r.failed.to_string()),
        list(&|r| r.events.to_string()),
    )
}

/// Streams that ended in one round, counted by the workers.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// Events of the streams that completed.
    events: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// `streams` streams through `service`, by `concurrency` tasks started evenly over
/// `ramp` (all at once if zero), each making calls one after the other until all have
/// been made. Returns the round and its first failure.
async fn round<S: Streaming>(
    service: &S,
    uri: &Uri,
    streams: usize,
    concurrency: usize,
    ramp: Duration,
    args: &Args,
    gauge: &Arc<Gauge>,
) -> (Round, Option<String>) {
    let started = tokio::time::Instant::now();
    let deadline = started + args.timeout;
    let (next, tally) = (Arc::new(AtomicUsize::new(0)), Arc::new(Tally::default()));
    let mut tasks = JoinSet::new();
    // In batches, one every 10 ms over the ramp.
    let workers = concurrency.min(streams);
    let batches = (ramp.as_millis() / 10).clamp(1, workers as u128) as u32;
    for batch in 0..batches {
        tokio::time::sleep_until(started + ramp * batch / batches).await;
        let (from, to) = (batch as usize, batch as usize + 1);
        for _ in workers * from / batches as usize..workers * to / batches as usize {
            let (service, uri, gauge) = (service.clone(), uri.clone(), gauge.clone());
            let (next, tally) = (next.clone(), tally.clone());
            tasks.spawn(worker(service, uri, gauge, next, streams, tally));
        }
    }
    let mut unfinished = 0;
    let mut first_error = None;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                let done = tally.ok.load(Relaxed) + tally.failed.load(Relaxed);
                unfinished = streams - done.min(streams);
                first_error = Some(format!(
                    "{unfinished} streams unfinished after {} s",
                    args.timeout.as_secs()
                ));
                break;
            }
        }
    }
    let round = Round {
        wall: started.elapsed(),
        ok: tally.ok.load(Relaxed),
        failed: tally.failed.load(Relaxed) + unfinished,
        events: tally.events.load(Relaxed),
    };
    let error = lock(&tally.first_error).take();
    (round, error.or(first_error))
}

/// Makes streams one after the other until `streams` have been started in all.
async fn worker<S, B>(
    mut service: S,
    uri: Uri,
    gauge: Arc<Gauge>,
    next: Arc<AtomicUsize>,
    streams: usize,
    tally: Arc<Tally>,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    while next.fetch_add(1, Relaxed) < streams {
        match stream(&mut service, uri.clone(), &gauge).await {
            Ok(events) => {
                tally.ok.fetch_add(1, Relaxed);
                tally.events.fetch_add(events, Relaxed);
            }
            Err(error) => {
                tally.failed.fetch_add(1, Relaxed);
                lock(&tally.first_error).get_or_insert(error);
            }
        }
    }
}

/// One streaming call, its body read to the end; the number of SSE events in it.
async fn stream<S, B>(service: &mut S, uri: Uri, gauge: &Arc<Gauge>) -> Result<u64, String>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let request = Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .map_err(|e| e.to_string())?;
    let ready = service.ready().await.map_err(|e| error_chain(&*e.into()))?;
    let response = ready
        .call(request)
        .await
        .map_err(|e| error_chain(&*e.into()))?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let _open = gauge.open();
    let mut body = std::pin::pin!(response.into_body());
    // An SSE event ends with a blank line; these events have no other "\n\n".
    let (mut events, mut last) = (0, 0u8);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error_chain(&*e.into()))?;
        if let Ok(data) = frame.into_data() {
            for &byte in data.iter() {
                if byte == b'\n' && last == b'\n' {
                    events += 1;
                    last = 0;
                } else {
                    last = byte;
                }
            }
        }
    }
    if events != EVENTS {
        return Err(format!("the body ended after {events} of {EVENTS} events"));
    }
    Ok(events)
}

/// The machine's count of connections dropped because a listener's accept queue was
/// full (`ListenOverflows`), where the system says.
fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let index = names
        .split_whitespace()
        .position(|name| name == "ListenOverflows")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// This process's soft limit on open files, where the system says (`u64::MAX` for
/// unlimited).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    match line["Max open files".len()..].split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

// ---------------------------------------------------------------------------------
// The parent process.

/// A server process, stopped when dropped.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

/// The server's counts.
#[derive(Debug, Default, Clone, Copy)]
struct ServerStats {
    peak: u64,
    hits: u64,
}

impl Server {
    fn start(exe: &Path, gap: Duration) -> Result<Self, String> {
        let mut child = Command::new(exe)
            .args(["--serve", "--gap-ms", &gap.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the server process: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the server process has no stdin or stdout".into());
        };
        let mut server = Server {
            child,
            stdin: Some(stdin),
            stdout,
            port: 0,
        };
        let line = server.line()?;
        server.port = line
            .strip_prefix("port=")
            .and_then(|port| port.trim().parse().ok())
            .ok_or_else(|| format!("the server said {line:?}, not port=<port>"))?;
        Ok(server)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err("the server process exited".into()),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(format!("cannot read from the server process: {e}")),
        }
    }

    fn stats(&mut self) -> Result<ServerStats, String> {
        let stdin = self.stdin.as_mut().ok_or("the server's stdin is closed")?;
        writeln!(stdin, "stats")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("cannot write to the server process: {e}"))?;
        let line = self.line()?;
        let fields = Fields::new(&line);
        match (fields.number("peak"), fields.number("hits")) {
            (Ok(peak), Ok(hits)) => Ok(ServerStats { peak, hits }),
            _ => Err(format!("the server said {line:?}")),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing stdin asks the server to exit; it is killed if it has not after 10 s.
        drop(self.stdin.take());
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_secs(10) {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `key=value` pairs of a result line.
struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Fields<'a> {
    fn new(line: &'a str) -> Self {
        Self(
            line.split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Result<&'a str, String> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("no {key} in the client's result"))
    }

    fn number<T: FromStr>(&self, key: &str) -> Result<T, String> {
        self.get(key)?
            .parse()
            .map_err(|_| format!("{key} is not a number"))
    }

    fn list<T: FromStr>(&self, key: &str) -> Result<Vec<T>, String> {
        self.get(key)?
            .split(',')
            .map(|item| item.parse().map_err(|_| format!("bad number in {key}")))
            .collect()
    }

    fn rounds(&self) -> Result<Vec<Round>, String> {
        let walls: Vec<f64> = self.list("walls")?;
        let (oks, fails, events) = (self.list("oks")?, self.list("fails")?, self.list("events")?);
        Ok((0..walls.len())
            .map(|i| Round {
                wall: Duration::from_secs_f64(walls[i]),
                ok: oks.get(i).copied().unwrap_or(0),
                failed: fails.get(i).copied().unwrap_or(0),
                events: events.get(i).copied().unwrap_or(0),
            })
            .collect())
    }
}

/// The memory figures of a run.
#[derive(Debug, Clone, Copy)]
struct Memory {
    baseline_kib: u64,
    peak_kib: u64,
    /// The most streams open in one RSS sample, and the RSS then.
    open_sampled: usize,
    open_kib: u64,
    /// The most streams open at once, sampled or not.
    max_open: usize,
    task_bytes: u64,
    /// Connections dropped by a full accept queue during the run, machine-wide.
    overflows: Option<u64>,
}

impl Memory {
    /// `(RSS with the most streams open - baseline) / those streams`, in bytes.
    fn per_open_stream(&self) -> Option<f64> {
        (self.open_sampled > 0).then(|| {
            self.open_kib.saturating_sub(self.baseline_kib) as f64 * 1024.0
                / self.open_sampled as f64
        })
    }
}

/// One configuration's figures in one phase.
#[derive(Debug, Clone)]
struct Row {
    phase: Phase,
    config: Config,
    proto: Proto,
    /// The counted rounds.
    rounds: Vec<Round>,
    server: ServerStats,
    memory: Option<Memory>,
}

impl Row {
    fn failed(&self) -> usize {
        self.rounds.iter().map(|round| round.failed).sum()
    }

    /// The median round by events/s.
    fn median(&self) -> Round {
        let mut rounds = self.rounds.clone();
        rounds.sort_by(|a, b| a.events_per_s().total_cmp(&b.events_per_s()));
        rounds.get(rounds.len() / 2).copied().unwrap_or_default()
    }

    fn events_per_s_range(&self) -> (f64, f64) {
        let rates = self.rounds.iter().map(Round::events_per_s);
        let min = rates.clone().fold(f64::INFINITY, f64::min);
        (min, rates.fold(0.0, f64::max))
    }
}

/// Runs a client process against a fresh server process; their output and counts.
fn run_pair(
    exe: &Path,
    args: &Args,
    gap: Duration,
    client_args: &[String],
) -> Result<(String, ServerStats, Option<u64>), String> {
    let overflows_before = listen_overflows();
    let mut server = Server::start(exe, gap)?;
    let output = Command::new(exe)
        .args(client_args)
        .args(["--port", &server.port.to_string()])
        .args(["--streams", &args.streams.to_string()])
        .args(["--limit", &args.limit.to_string()])
        .args(["--timeout-s", &args.timeout.as_secs().to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the client process: {e}"))?;
    let stats = server.stats()?;
    drop(server);
    let overflows = overflows_before
        .zip(listen_overflows())
        .map(|(before, after)| after.saturating_sub(before));
    if !output.status.success() {
        return Err(format!("the client process failed ({})", output.status));
    }
    Ok((
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stats,
        overflows,
    ))
}

/// The result line of `config` in a client's output.
fn result_line<'a>(stdout: &'a str, config: Config) -> Result<Fields<'a>, String> {
    let tag = format!("config={}", config.flag());
    stdout
        .lines()
        .find(|line| line.starts_with("result ") && line.split_whitespace().any(|f| f == tag))
        .map(Fields::new)
        .ok_or_else(|| format!("the client printed no result for {}", config.name()))
}

/// One memory run: `config` alone in its client process.
fn measure_memory(exe: &Path, args: &Args, config: Config, proto: Proto) -> Result<Row, String> {
    let client_args = [
        "--run",
        config.flag(),
        "--proto",
        proto.flag(),
        "--ramp-ms",
        &args.ramp.as_millis().to_string(),
    ]
    .map(String::from);
    let (stdout, server, overflows) = run_pair(exe, args, args.gap, &client_args)?;
    let fields = result_line(&stdout, config)?;
    Ok(Row {
        phase: Phase::Memory,
        config,
        proto,
        rounds: fields.rounds()?,
        server,
        memory: Some(Memory {
            baseline_kib: fields.number("baseline_kib")?,
            peak_kib: fields.number("peak_kib")?,
            open_sampled: fields.number("open_sampled")?,
            open_kib: fields.number("open_kib")?,
            max_open: fields.number("max_open")?,
            task_bytes: fields.number("task_bytes")?,
            overflows,
        }),
    })
}

/// The throughput run of one protocol: the configurations of `--configs` in one client
/// process.
fn measure_throughput(exe: &Path, args: &Args, proto: Proto) -> Result<Vec<Row>, String> {
    let configs: Vec<&str> = args.configs.iter().map(|c| c.flag()).collect();
    let client_args = [
        "--run",
        "throughput",
        "--proto",
        proto.flag(),
        "--concurrency",
        &args.concurrency.to_string(),
        "--rounds",
        &args.rounds.to_string(),
        "--configs",
        &configs.join(","),
    ]
    .map(String::from);
    let (stdout, server, _) = run_pair(exe, args, Duration::ZERO, &client_args)?;
    args.configs
        .iter()
        .map(|&config| {
            Ok(Row {
                phase: Phase::Throughput,
                config,
                proto,
                rounds: result_line(&stdout, config)?.rounds()?,
                server,
                memory: None,
            })
        })
        .collect()
}

fn parent(args: &Args) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("loadtest: cannot find this executable to start the processes: {e}");
            return ExitCode::FAILURE;
        }
    };
    // HTTP/1.1 needs a socket per open stream in each process.
    if args.protos.contains(&Proto::Http1) {
        let needed = args.streams as u64 + FD_MARGIN;
        match open_files_limit() {
            Some(limit) if limit < needed => {
                eprintln!(
                    "loadtest: the open-files limit is {limit}, and {} HTTP/1.1 streams need \
                     {needed} in each process (client and server).\n\
                     Raise it in this shell, e.g. `ulimit -n 20000` (at most the hard limit, \
                     `ulimit -Hn`), or run fewer streams (--streams) or only HTTP/2 (--proto h2).",
                    args.streams
                );
                return ExitCode::FAILURE;
            }
            Some(_) => {}
            None => eprintln!("loadtest: cannot read the open-files limit; going on"),
        }
    }

    let mut runs = Vec::new();
    for &phase in &args.phases {
        for &proto in &args.protos {
            match phase {
                Phase::Memory => runs.extend(Config::MEMORY.map(|c| (phase, proto, Some(c)))),
                Phase::Throughput => runs.push((phase, proto, None)),
            }
        }
    }
    eprintln!(
        "loadtest: {} streams of {EVENTS} SSE events per run; memory: gap {} ms, ramp {} ms; \
         throughput: gap 0, {} at a time, {} rounds; limit {}",
        args.streams,
        args.gap.as_millis(),
        args.ramp.as_millis(),
        args.concurrency,
        args.rounds,
        args.limit
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed_runs = 0;
    let names: Vec<&str> = args.configs.iter().map(|c| c.name()).collect();
    let in_turns = format!("{} in turns", names.join(", "));
    for (i, &(phase, proto, config)) in runs.iter().enumerate() {
        let what = config.map_or(in_turns.as_str(), |config| config.name());
        eprint!(
            "[{}/{}] {:<10} {} {what} ... ",
            i + 1,
            runs.len(),
            phase.name(),
            proto.flag()
        );
        let _ = std::io::stderr().flush();
        let run_started = Instant::now();
        let result = match config {
            Some(config) => measure_memory(&exe, args, config, proto).map(|row| vec![row]),
            None => measure_throughput(&exe, args, proto),
        };
        match result {
            Ok(new) => {
                let summary: Vec<String> = new
                    .iter()
                    .map(|row| {
                        format!(
                            "{} {:.0} events/s, {} failed",
                            row.config.name(),
                            row.median().events_per_s(),
                            row.failed()
                        )
                    })
                    .collect();
                eprintln!(
                    "{:.1} s: {}; server peak {}",
                    run_started.elapsed().as_secs_f64(),
                    summary.join("; "),
                    new.first().map_or(0, |row| row.server.peak)
                );
                rows.extend(new);
            }
            Err(message) => {
                eprintln!("failed: {message}");
                failed_runs += 1;
            }
        }
    }
    let total = started.elapsed();

    for &phase in &args.phases {
        match phase {
            Phase::Memory => print_memory(args, &rows),
            Phase::Throughput => print_throughput(args, &rows),
        }
    }
    let limits_ok = print_checks(args, &rows);
    println!();
    println!(
        "no OpenTelemetry meter provider installed: the layers recorded to the no-op global one"
    );
    println!(
        "total wall time {:.1} s, {} runs, {failed_runs} failed",
        total.as_secs_f64(),
        runs.len()
    );
    let streams_failed = rows.iter().any(|row| row.failed() > 0);
    if failed_runs > 0 || !limits_ok || streams_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_memory(args: &Args, rows: &[Row]) {
    println!();
    println!(
        "== memory: gap {} ms between events, {} streams started over {} ms, all open at once ==",
        args.gap.as_millis(),
        args.streams,
        args.ramp.as_millis()
    );
    println!(
        "{:<12} {:<5} {:>7} {:>6} {:>6} {:>9} {:>8} {:>8} {:>8} {:>6} {:>8} {:>10} {:>6} {:>8} {:>8}",
        "config",
        "proto",
        "streams",
        "failed",
        "wall s",
        "streams/s",
        "events/s",
        "base MiB",
        "peak MiB",
        "open",
        "open MiB",
        "B/open str",
        "task B",
        "srv peak",
        "acc drop"
    );
    let memory_rows = rows.iter().filter(|row| row.phase == Phase::Memory);
    for row in memory_rows.clone() {
        let Some(memory) = row.memory else { continue };
        let round = row.median();
        let per_stream = memory
            .per_open_stream()
            .map_or("-".to_owned(), |bytes| format!("{bytes:.0}"));
        println!(
            "{:<12} {:<5} {:>7} {:>6} {:>6.2} {:>9.0} {:>8.0} {:>8.1} {:>8.1} {:>6} {:>8.1} {:>10} {:>6} {:>8} {:>8}",
            row.config.name(),
            row.proto.flag(),
            round.ok + round.failed,
            row.failed(),
            round.wall.as_secs_f64(),
            (round.ok + round.failed) as f64 / round.wall.as_secs_f64().max(1e-9),
            round.events_per_s(),
            mib(memory.baseline_kib),
            mib(memory.peak_kib),
            memory.open_sampled,
            mib(memory.open_kib),
            per_stream,
            memory.task_bytes,
            row.server.peak,
            memory.overflows.map_or("-".to_owned(), |n| n.to_string())
        );
    }
    for row in memory_rows {
        let Some(memory) = row.memory else { continue };
        if row.config != Config::Limit && memory.open_sampled < args.streams {
            println!(
                "note: {} {}: at most {} of {} streams were open in one sample ({} between \
                 samples); raise --gap-ms so that they all overlap",
                row.config.name(),
                row.proto.flag(),
                memory.open_sampled,
                args.streams,
                memory.max_open
            );
        }
    }
}

fn print_throughput(args: &Args, rows: &[Row]) {
    println!();
    println!(
        "== throughput: no gap, {} streams a round, {} at a time; median of {} rounds each, \
         the {} configurations in turns ==",
        args.streams,
        args.concurrency,
        args.rounds,
        args.configs.len()
    );
    println!(
        "{:<12} {:<5} {:>7} {:>6} {:>6} {:>9} {:>8} {:>17} {:>8}",
        "config",
        "proto",
        "streams",
        "failed",
        "wall s",
        "streams/s",
        "events/s",
        "events/s min..max",
        "srv peak"
    );
    for row in rows.iter().filter(|row| row.phase == Phase::Throughput) {
        let round = row.median();
        let (min, max) = row.events_per_s_range();
        println!(
            "{:<12} {:<5} {:>7} {:>6} {:>6.3} {:>9.0} {:>8.0} {:>17} {:>8}",
            row.config.name(),
            row.proto.flag(),
            round.ok + round.failed,
            row.failed(),
            round.wall.as_secs_f64(),
            (round.ok + round.failed) as f64 / round.wall.as_secs_f64().max(1e-9),
            round.events_per_s(),
            format!("{min:.0}..{max:.0}"),
            row.server.peak
        );
    }
    println!("(wall s, streams/s, events/s: the median round; srv peak: all of them together)");
}

/// The ratios of `row`'s rounds to `base`'s, turn by turn: their median and middle
/// half (first to third quartile).
fn paired_ratio(row: &Row, base: &Row) -> Option<(f64, f64, f64)> {
    let mut ratios: Vec<f64> = row
        .rounds
        .iter()
        .zip(&base.rounds)
        .map(|(a, b)| a.events_per_s() / b.events_per_s().max(1e-9))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = q * (ratios.len() - 1) as f64;
        let (low, high) = (ratios[rank.floor() as usize], ratios[rank.ceil() as usize]);
        low + (high - low) * rank.fract()
    };
    (!ratios.is_empty()).then(|| (at(0.5), at(0.25), at(0.75)))
}

/// Prints the limit check and the ratios; false if the limit check failed.
fn print_checks(args: &Args, rows: &[Row]) -> bool {
    let find = |phase, config, proto| {
        rows.iter()
            .find(|row| row.phase == phase && row.config == config && row.proto == proto)
    };
    let mut ok = true;
    let expected = args.limit.min(args.streams) as u64;
    if args.phases.contains(&Phase::Memory) {
        println!();
        println!(
            "limit check: StreamConcurrencyLayer::new({}), no max_wait, {} streams",
            args.limit, args.streams
        );
        for &proto in &args.protos {
            let Some(row) = find(Phase::Memory, Config::Limit, proto) else {
                continue;
            };
            let peak = row.server.peak;
            let verdict = if peak == expected { "OK" } else { "MISMATCH" };
            ok &= peak == expected;
            println!(
                "  {}: server peak concurrent streams {peak}, expected {expected}: {verdict} \
                 ({} requests)",
                proto.flag(),
                row.server.hits
            );
        }
    }

    println!();
    println!("what the stack costs");
    for &proto in &args.protos {
        let p = proto.flag();
        let throughput = |config| find(Phase::Throughput, config, proto);
        let bare = throughput(Config::Bare);
        let contenders = args.configs.iter().filter(|&&c| c != Config::Bare);
        for (config, row) in contenders.filter_map(|&c| Some((c, throughput(c)?))) {
            let Some((ratio, low, high)) = bare.and_then(|bare| paired_ratio(row, bare)) else {
                continue;
            };
            let note = match config {
                Config::Stack => {
                    // Compared as printed, to three decimals.
                    let goal = if (ratio * 1000.0).round() >= 970.0 {
                        "met"
                    } else {
                        "NOT met"
                    };
                    format!("goal >= 0.97: {goal}")
                }
                Config::Limit if args.concurrency <= args.limit => format!(
                    "the same stack again: {} at a time never reach the limit",
                    args.concurrency
                ),
                Config::Limit => format!("calls wait for one of {} slots", args.limit),
                other => other.about().to_owned(),
            };
            println!(
                "  {p}  {:<31}{ratio:.3}  (median of {} turns, middle half {low:.3}..{high:.3}; \
                 {note})",
                format!("events/s {} / bare", config.name()),
                row.rounds.len()
            );
        }
        if let (Some(stack), Some(tower)) = (throughput(Config::Stack), throughput(Config::Tower)) {
            if let Some((ratio, low, high)) = paired_ratio(stack, tower) {
                println!(
                    "  {p}  {:<31}{ratio:.3}  (middle half {low:.3}..{high:.3}; ours against \
                     what tower offers)",
                    "events/s stack / tower"
                );
            }
        }
        let per_stream = |config| {
            find(Phase::Memory, config, proto)
                .and_then(|row| row.memory)
                .and_then(|memory| memory.per_open_stream())
        };
        if let (Some(bare), Some(stack)) = (per_stream(Config::Bare), per_stream(Config::Stack)) {
            let extra = stack - bare;
            let goal = if extra <= 512.0 { "met" } else { "NOT met" };
            println!(
                "  {p}  extra RSS per open stream     {extra:+.0} B  ({stack:.0} - {bare:.0}; \
                 goal <= 512 B: {goal})"
            );
        }
    }
    ok
}
