//! Fleet scale, by simulation: the real token cache (and its refresh,
//! backoff and single-flight code) for every node, on tokio's virtual clock,
//! against a simulated ECR API that enforces AWS's GetAuthorizationToken
//! quota as a token bucket (20 requests/s sustained, bursts to 200; beyond
//! that, ThrottlingException). Each node's fetch behaves like the SDK's
//! standard retries (the policy's attempts, 200 ms doubling backoff with
//! full jitter), drawn from the node's own random sequence; the cache's
//! jitter comes from a seeded sequence of the node too, and every sequence
//! derives from one seed (`FLEET_SEED`, printed), so a run replays exactly.
//!
//! Each scenario runs two policies side by side and prints one table
//! (`--nocapture`) that the README quotes: the one before this tuning
//! (error backoff 1 s doubling to 60 s for every failure, half jitter) and
//! the shipped one ([`RetryPolicy::default`]: after throttling, the retry
//! at a random moment within 5 minutes, each later one within 3, and the
//! SDK makes one attempt per fetch, as the daemon's client does, instead
//! of retrying a failed call within the second).
//! - steady state: 10,000 nodes for 7 days, pulls at random times, node
//!   restarts, and a 0.1 % rate of AWS 5xx errors;
//! - mass boot: 10,000 nodes booting within 5 minutes, each pulling at once
//!   and retrying like kubelet (10 s doubling to 5 min) until it has a token;
//!   each pull waits up to the default `token_wait` while the cache retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ecr_pull_proxy::config::DEFAULT_TOKEN_WAIT;
use ecr_pull_proxy::ecr::aws::RETRY_MAX_ATTEMPTS;
use ecr_pull_proxy::ecr::{
    CredentialSource, EcrService, EndpointVariant, ErrorKind, RetryPolicy, SourceError, Token,
    TokenCache, TokenKey,
};
use ecr_pull_proxy::pull::Credentials;
use futures_util::future::BoxFuture;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const NODES: usize = 10_000;
const RATE: f64 = 20.0;
const BURST: f64 = 200.0;
/// The SDK's attempts per fetch in its standard retry mode, as the daemon
/// used it before this tuning.
const SDK_STANDARD_ATTEMPTS: u32 = 3;
/// The run's seed when `FLEET_SEED` does not name one.
const DEFAULT_SEED: u64 = 1;

/// The seed every random sequence of a run derives from: `FLEET_SEED`, or
/// [`DEFAULT_SEED`]. Printed, so a run can be replayed.
fn run_seed() -> u64 {
    match std::env::var("FLEET_SEED") {
        Ok(s) => s.parse().expect("FLEET_SEED is a number"),
        Err(_) => DEFAULT_SEED,
    }
}

/// The seed of sequence `n` of a run (a node, or the API).
fn seed_of(run: u64, n: u64) -> u64 {
    run.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n
}

/// The policy before this tuning: every failure backed off from 1 s
/// doubling to 60 s, each wait drawn from the upper half.
fn before_tuning() -> RetryPolicy {
    RetryPolicy {
        backoff_min: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        throttled: None,
        full_jitter: false,
    }
}

/// A retry policy: the cache's, and the SDK's attempts per fetch.
type Policy = (RetryPolicy, u32);

/// The two policies each scenario compares: before tuning, the SDK retried
/// a failed call up to 3 times; the shipped daemon makes the attempts its
/// SDK client is built with (`RETRY_MAX_ATTEMPTS`, one) and lets the cache
/// retry.
fn policies() -> [(&'static str, Policy); 2] {
    [
        ("before tuning", (before_tuning(), SDK_STANDARD_ATTEMPTS)),
        ("shipped", (RetryPolicy::default(), RETRY_MAX_ATTEMPTS)),
    ]
}

/// The account-and-region quota, and what reached it.
struct Api {
    tokens: f64,
    last: Instant,
    start: Instant,
    calls: u64,
    throttled: u64,
    errors: u64,
    /// Requests per virtual second.
    per_second: HashMap<u64, u32>,
    /// Seconds in which the bucket was found empty.
    empty_seconds: std::collections::HashSet<u64>,
    error_rate: f64,
    rng: rand::rngs::StdRng,
}

enum Answer {
    Token,
    Throttled,
    ServerError,
}

impl Api {
    fn new(error_rate: f64, seed: u64) -> Self {
        let now = Instant::now();
        Api {
            tokens: BURST,
            last: now,
            start: now,
            calls: 0,
            throttled: 0,
            errors: 0,
            per_second: HashMap::new(),
            empty_seconds: Default::default(),
            error_rate,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    fn request(&mut self) -> Answer {
        let now = Instant::now();
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * RATE).min(BURST);
        self.last = now;
        self.calls += 1;
        let second = (now - self.start).as_secs();
        *self.per_second.entry(second).or_default() += 1;
        if self.tokens < 1.0 {
            self.throttled += 1;
            self.empty_seconds.insert(second);
            return Answer::Throttled;
        }
        self.tokens -= 1.0;
        if self.rng.random_bool(self.error_rate) {
            self.errors += 1;
            return Answer::ServerError;
        }
        Answer::Token
    }
}

/// One node's view of the API: the SDK's standard retries around it. The
/// node's random sequence lives as long as the node, so each fetch draws
/// new jitter (a sequence seeded per fetch from the clock would repeat on
/// the paused clock).
struct NodeSource {
    api: Arc<Mutex<Api>>,
    rng: Arc<Mutex<rand::rngs::StdRng>>,
    /// The SDK's attempts per fetch.
    attempts: u32,
    /// Calls this node made, across its restarts.
    calls: Arc<AtomicU64>,
    /// When the node first got a token.
    first_token: Arc<Mutex<Option<Instant>>>,
}

impl CredentialSource for NodeSource {
    fn fetch(&self, _: &TokenKey) -> BoxFuture<'static, Result<Token, SourceError>> {
        let api = self.api.clone();
        let rng = self.rng.clone();
        let attempts = self.attempts;
        let calls = self.calls.clone();
        let first_token = self.first_token.clone();
        Box::pin(async move {
            let mut last = Answer::Throttled;
            for attempt in 0..attempts {
                tokio::time::sleep(Duration::from_millis(30)).await;
                calls.fetch_add(1, Ordering::Relaxed);
                last = api.lock().unwrap().request();
                if let Answer::Token = last {
                    first_token.lock().unwrap().get_or_insert_with(Instant::now);
                    return Ok(Token {
                        credentials: Credentials {
                            username: "AWS".into(),
                            password: "p".into(),
                        },
                        expires_at: SystemTime::now() + Duration::from_secs(12 * 3600),
                    });
                }
                if attempt + 1 < attempts {
                    let cap = (0.2 * 2f64.powi(attempt as i32)).min(2.0);
                    let wait = rng.lock().unwrap().random_range(0.0..cap);
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                }
            }
            Err(match last {
                Answer::Throttled => SourceError::new(
                    ErrorKind::Throttled,
                    Some("ThrottlingException".into()),
                    "rate exceeded",
                ),
                _ => SourceError::new(ErrorKind::Network, Some("HTTP 500".into()), "server error"),
            })
        })
    }
}

fn key() -> TokenKey {
    TokenKey {
        service: EcrService::Private,
        partition: "aws",
        region: "us-east-1".into(),
        variant: EndpointVariant::default(),
        role: None,
    }
}

/// A node's cache; `first_token` is set when its first token arrives,
/// and `calls` counts the node's calls to the API.
fn node_cache_seeing(
    api: &Arc<Mutex<Api>>,
    seed: u64,
    policy: Policy,
    first_token: Arc<Mutex<Option<Instant>>>,
    calls: Arc<AtomicU64>,
) -> TokenCache {
    let (policy, attempts) = policy;
    TokenCache::new(
        Arc::new(NodeSource {
            api: api.clone(),
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))),
            attempts,
            calls,
            first_token,
        }),
        None,
        Arc::default(),
    )
    .with_retry(policy)
    // The cache's own jitter, from another sequence of the same node.
    .with_seed(!seed)
}

/// A table with one column per policy.
fn print_table(title: &str, columns: &[&str], rows: &[(&str, Vec<String>)]) {
    println!("\n{title}\n| figure | {} |", columns.join(" | "));
    println!("| --- |{}", " --- |".repeat(columns.len()));
    for (k, v) in rows {
        println!("| {k} | {} |", v.join(" | "));
    }
}

/// What one steady-state run showed.
struct Steady {
    per_node_day: f64,
    /// The busiest node's calls per day.
    most_per_node_day: f64,
    steady_tps: f64,
    peak: u32,
    throttled: u64,
    saturated_seconds: usize,
    errors: u64,
    failed: u64,
    /// From each node (re)start to its first token, sorted.
    tokened: Vec<Duration>,
}

/// The most calls any one node made.
fn most(calls: &[Arc<AtomicU64>]) -> u64 {
    calls
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0)
}

/// The `p` quantile of sorted durations.
fn quantile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn steady_state(policy: Policy, seed: u64) -> Steady {
    const DAYS: u64 = 7;
    let api = Arc::new(Mutex::new(Api::new(0.001, seed_of(seed, u64::MAX))));
    let horizon = Duration::from_secs(DAYS * 24 * 3600);
    let start = Instant::now();
    let failed_pulls = Arc::new(Mutex::new(0u64));
    let tokened = Arc::new(Mutex::new(Vec::new()));
    let node_calls: Vec<Arc<AtomicU64>> = (0..NODES).map(|_| Arc::default()).collect();
    let mut tasks = Vec::with_capacity(NODES);
    for (n, calls) in node_calls.iter().cloned().enumerate() {
        let (api, failed, tokened) = (api.clone(), failed_pulls.clone(), tokened.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed_of(seed, n as u64));
            // Nodes come up over the first hour, then pull every 2 h on
            // average and restart about once a week.
            tokio::time::sleep(Duration::from_secs(rng.random_range(0..3600))).await;
            let mut started = Instant::now();
            let mut first = Arc::new(Mutex::new(None));
            let mut cache =
                node_cache_seeing(&api, rng.random(), policy, first.clone(), calls.clone());
            let record = |started: Instant, first: &Arc<Mutex<Option<Instant>>>| {
                if let Some(at) = *first.lock().unwrap() {
                    tokened.lock().unwrap().push(at - started);
                }
            };
            while start.elapsed() < horizon {
                if rng.random_bool(1.0 / (7.0 * 12.0)) {
                    record(started, &first);
                    started = Instant::now();
                    first = Arc::new(Mutex::new(None));
                    cache =
                        node_cache_seeing(&api, rng.random(), policy, first.clone(), calls.clone());
                }
                if cache.get(&key(), DEFAULT_TOKEN_WAIT).await.is_err() {
                    *failed.lock().unwrap() += 1;
                }
                let gap: f64 = rng.random_range(0.0..4.0 * 3600.0);
                tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            }
            record(started, &first);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let api = api.lock().unwrap();
    let days_after_first = (api.per_second.keys().max().unwrap() - 86_400) as f64;
    let steady_calls: u32 = api
        .per_second
        .iter()
        .filter(|(s, _)| **s >= 86_400)
        .map(|(_, c)| c)
        .sum();
    let failed = *failed_pulls.lock().unwrap();
    let mut tokened = tokened.lock().unwrap().clone();
    tokened.sort();
    Steady {
        per_node_day: api.calls as f64 / NODES as f64 / DAYS as f64,
        most_per_node_day: most(&node_calls) as f64 / DAYS as f64,
        steady_tps: f64::from(steady_calls) / days_after_first,
        peak: api.per_second.values().max().copied().unwrap_or(0),
        throttled: api.throttled,
        saturated_seconds: api.empty_seconds.len(),
        errors: api.errors,
        failed,
        tokened,
    }
}

#[tokio::test(start_paused = true)]
async fn steady_state_fleet_stays_far_below_the_quota() {
    let seed = run_seed();
    println!("fleet seed {seed} (FLEET_SEED=N replays a run)");
    let mut runs = Vec::new();
    for (_, policy) in policies() {
        runs.push(steady_state(policy, seed).await);
    }
    let col = |f: &dyn Fn(&Steady) -> String| runs.iter().map(f).collect::<Vec<_>>();
    print_table(
        "fleet simulation: 10,000 nodes for 7 days (pulls every 2 h on average, weekly restarts, 0.1 % AWS errors)",
        &policies().map(|(name, _)| name),
        &[
            ("API calls per node per day", col(&|r| format!("{:.2}", r.per_node_day))),
            ("API calls per day of the busiest node", col(&|r| format!("{:.2}", r.most_per_node_day))),
            ("steady-state fleet TPS (days 2-7)", col(&|r| format!("{:.3}", r.steady_tps))),
            ("peak TPS (any second)", col(&|r| r.peak.to_string())),
            ("throttled calls", col(&|r| r.throttled.to_string())),
            ("seconds the quota was saturated", col(&|r| r.saturated_seconds.to_string())),
            ("AWS errors injected", col(&|r| r.errors.to_string())),
            ("pulls that got no token", col(&|r| r.failed.to_string())),
            (
                "(re)start to first token: median / p99 / slowest",
                col(&|r| {
                    let ms = |d: Duration| format!("{} ms", d.as_millis());
                    format!(
                        "{} / {} / {}",
                        ms(quantile(&r.tokened, 0.5)),
                        ms(quantile(&r.tokened, 0.99)),
                        ms(*r.tokened.last().unwrap())
                    )
                }),
            ),
        ],
    );
    let shipped = &runs[1];
    // The target: at most 0.5 TPS for 10,000 nodes, unchanged or better.
    assert!(
        shipped.steady_tps <= 0.5,
        "steady state {} TPS",
        shipped.steady_tps
    );
    assert!(shipped.steady_tps <= runs[0].steady_tps * 1.05);
    assert_eq!(shipped.throttled, 0);
    assert_eq!(shipped.saturated_seconds, 0);
    // No node calls much more than the rest: a renewal every ~6 h of a
    // 12-hour token (4 a day), now and then a restart's or an error's
    // call on top.
    assert!(
        shipped.most_per_node_day <= 6.0,
        "busiest node {:.2} calls a day",
        shipped.most_per_node_day
    );
    // Every node start got its token, and at its first call (the
    // simulated API answers in 30 ms; an AWS error costs a retry).
    assert!(shipped.tokened.len() >= NODES);
    assert!(quantile(&shipped.tokened, 0.99) < Duration::from_millis(100));
    // Errors happened, and a cached token served through every one.
    assert!(shipped.errors > 0);
    assert_eq!(
        shipped.failed, 0,
        "the cached token serves through AWS errors"
    );
}

/// What one mass boot showed.
struct Boot {
    /// Each node's wait until its cache held a token, sorted.
    tokened: Vec<Duration>,
    /// Each node's wait for its first successful pull (kubelet asks again
    /// on its own back-off, so this trails the token), sorted.
    waits: Vec<Duration>,
    calls: u64,
    /// The most calls one node made.
    most_per_node: u64,
    throttled: u64,
    peak: u32,
    saturated_seconds: usize,
    last_call: u64,
}

impl Boot {
    fn pct(&self, p: f64) -> Duration {
        self.tokened[((self.tokened.len() as f64 * p) as usize).min(self.tokened.len() - 1)]
    }

    fn pull_pct(&self, p: f64) -> Duration {
        self.waits[((self.waits.len() as f64 * p) as usize).min(self.waits.len() - 1)]
    }

    fn per_node(&self) -> f64 {
        self.calls as f64 / NODES as f64
    }
}

async fn mass_boot(policy: Policy, seed: u64) -> Boot {
    let api = Arc::new(Mutex::new(Api::new(0.0, seed_of(seed, u64::MAX))));
    let waits = Arc::new(Mutex::new(Vec::with_capacity(NODES)));
    let tokened = Arc::new(Mutex::new(Vec::with_capacity(NODES)));
    let node_calls: Vec<Arc<AtomicU64>> = (0..NODES).map(|_| Arc::default()).collect();
    let mut tasks = Vec::with_capacity(NODES);
    for (n, calls) in node_calls.iter().cloned().enumerate() {
        let (api, waits, tokened) = (api.clone(), waits.clone(), tokened.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed_of(seed, n as u64));
            tokio::time::sleep(Duration::from_secs_f64(rng.random_range(0.0..300.0))).await;
            let booted = Instant::now();
            let first_token = Arc::new(Mutex::new(None));
            let cache = node_cache_seeing(&api, rng.random(), policy, first_token.clone(), calls);
            // kubelet's image pull backoff: 10 s doubling to 5 min.
            let mut backoff = Duration::from_secs(10);
            loop {
                if cache.get(&key(), DEFAULT_TOKEN_WAIT).await.is_ok() {
                    waits.lock().unwrap().push(booted.elapsed());
                    let at = first_token.lock().unwrap().expect("a token was fetched");
                    tokened.lock().unwrap().push(at - booted);
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut waits = waits.lock().unwrap().clone();
    waits.sort();
    let mut tokened = tokened.lock().unwrap().clone();
    tokened.sort();
    let api = api.lock().unwrap();
    Boot {
        tokened,
        waits,
        calls: api.calls,
        most_per_node: most(&node_calls),
        throttled: api.throttled,
        peak: api.per_second.values().max().copied().unwrap_or(0),
        saturated_seconds: api.empty_seconds.len(),
        last_call: *api.per_second.keys().max().unwrap(),
    }
}

#[tokio::test(start_paused = true)]
async fn mass_boot_gives_every_node_a_token_within_ten_minutes_in_few_calls() {
    let seed = run_seed();
    println!("fleet seed {seed} (FLEET_SEED=N replays a run)");
    let mut runs = Vec::new();
    for (_, policy) in policies() {
        runs.push(mass_boot(policy, seed).await);
    }
    let col = |f: &dyn Fn(&Boot) -> String| runs.iter().map(f).collect::<Vec<_>>();
    let secs = |d: Duration| format!("{:.0} s", d.as_secs_f64());
    print_table(
        "fleet simulation: 10,000 nodes booting within 5 minutes (kubelet retries 10 s doubling to 5 min)",
        &policies().map(|(name, _)| name),
        &[
            ("nodes with a token", col(&|r| r.waits.len().to_string())),
            ("API calls per node", col(&|r| format!("{:.2}", r.per_node()))),
            ("API calls of the busiest node", col(&|r| r.most_per_node.to_string())),
            ("API calls (attempts)", col(&|r| r.calls.to_string())),
            ("throttled calls", col(&|r| r.throttled.to_string())),
            ("peak TPS (any second)", col(&|r| r.peak.to_string())),
            ("seconds the quota was saturated", col(&|r| r.saturated_seconds.to_string())),
            ("time to first token: median", col(&|r| secs(r.pct(0.5)))),
            ("time to first token: p99", col(&|r| secs(r.pct(0.99)))),
            ("time to first token: slowest node", col(&|r| secs(*r.tokened.last().unwrap()))),
            ("first successful pull (kubelet's retry schedule): median / p99 / slowest", col(&|r| format!("{} / {} / {}", secs(r.pull_pct(0.5)), secs(r.pull_pct(0.99)), secs(*r.waits.last().unwrap())))),
            ("last API call", col(&|r| format!("{} s after the first boot", r.last_call))),
        ],
    );
    let (before, shipped) = (&runs[0], &runs[1]);
    assert_eq!(shipped.waits.len(), NODES, "every node gets a token");
    // The targets: every node holds a token within ten minutes of booting
    // (its next pull then succeeds at once; kubelet may ask later), in at
    // most 3 calls per node on average.
    let slowest = *shipped.tokened.last().unwrap();
    assert!(
        slowest <= Duration::from_secs(600),
        "slowest node waited {slowest:?}"
    );
    assert!(
        shipped.per_node() <= 3.0,
        "{:.2} calls per node",
        shipped.per_node()
    );
    // And no node far beyond: its first call, a retry within the first
    // 5-minute window, one per 3-minute window after it, and a call for a
    // kubelet pull that comes after a cached error lapsed (7 or 8 on seeds
    // 1-6; before tuning about 49).
    assert!(
        shipped.most_per_node <= 10 && shipped.most_per_node * 4 < before.most_per_node,
        "busiest node {} calls (before {})",
        shipped.most_per_node,
        before.most_per_node
    );
    // Peak at most 100 TPS (before: over 700).
    assert!(shipped.peak <= 100, "peak {} TPS", shipped.peak);
    // Time to first token no worse than before: the median (a few seconds
    // against 24 s: with the backlog's retries out of the way, most nodes
    // get a token at their first call) and the p99 (about 370 s against
    // 400).
    assert!(
        shipped.pct(0.5) <= before.pct(0.5),
        "median {:?} (before {:?})",
        shipped.pct(0.5),
        before.pct(0.5)
    );
    assert!(
        shipped.pct(0.99) <= before.pct(0.99),
        "p99 {:?} (before {:?})",
        shipped.pct(0.99),
        before.pct(0.99)
    );
    // What an account's other callers gain: far fewer throttled calls and
    // seconds of a saturated quota than before.
    assert!(shipped.throttled * 4 < before.throttled);
    assert!(shipped.saturated_seconds < before.saturated_seconds);
}
