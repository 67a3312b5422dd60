//! The token cache: one token per [`TokenKey`], renewed in the background.
//!
//! - A token is used until `expiresAt` minus [`EXPIRY_MARGIN`] (or the
//!   configured maximum age) and renewed in the background once half of that
//!   has passed, with jitter, so after the first pull no pull waits on AWS.
//! - Concurrent misses make one call: the fetch runs in its own task holding
//!   the key's fetch lock, so a caller that gives up does not cancel it.
//! - A token already expired on arrival (clock skew; emulators) serves that
//!   pull and is kept for at most [`EXPIRED_ON_ARRIVAL_TTL`].
//! - Errors are cached with exponential backoff from [`ERROR_BACKOFF_MIN`]
//!   to [`ERROR_BACKOFF_MAX`] (when AWS throttled: a retry within
//!   [`THROTTLED_FIRST_WINDOW`], then within [`THROTTLED_RETRY_WINDOW`]),
//!   so a broken role cannot call AWS at pull rate; a still-usable token
//!   keeps serving while AWS fails.
//! - A fetch that fails for a passing reason (throttling, network, timeout)
//!   is retried in the background on that backoff, with full jitter, for as long
//!   as pulls keep asking (within [`RETRY_WHILE_WANTED`]); a pull waits for
//!   those retries up to the configured token wait. So when a whole fleet
//!   boots into the API quota, a node gets its token as soon as the quota
//!   allows, not at kubelet's next back-off step.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::{CredentialSource, EcrService, SourceError, Token, TokenKey};
use crate::ecr::Credentials;
use crate::ops::metrics::{Metrics, TokenLabels};

/// A token is not used closer than this to its `expiresAt`.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);
/// How long a token that arrived already expired (or nearly so) is kept.
pub const EXPIRED_ON_ARRIVAL_TTL: Duration = Duration::from_secs(60);
/// First backoff after a failed fetch (network, timeout, AWS 5xx).
pub const ERROR_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest backoff after repeated failures.
pub const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// After AWS first throttled a fetch, the retry comes at a random moment
/// within this window. `GetAuthorizationToken`'s quota (20/s, bursts of
/// 200) is shared by a whole account and region, so throttling means it is
/// spent: a fleet booting together must push its retries past the wave of
/// first calls, leaving the quota to nodes asking for the first time.
/// Tuned on the fleet simulation (tests/fleet.rs, README "Fleet scale").
pub const THROTTLED_FIRST_WINDOW: Duration = Duration::from_secs(300);
/// Each further retry while AWS keeps throttling comes within this window:
/// shorter than the first, so nodes that have waited longest get the
/// quota's spare slots after the wave, but long enough that a fleet waiting
/// out a lasting throttle calls at most once per node per 90 s on average.
pub const THROTTLED_RETRY_WINDOW: Duration = Duration::from_secs(180);

/// How a fetch that failed for a passing reason is retried while pulls
/// wait for it: exponential backoff between `backoff_min` and
/// `backoff_max`, or, when AWS throttled, the throttling windows; each wait
/// drawn at random.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff after a failure other than throttling.
    pub backoff_min: Duration,
    /// Longest backoff after such failures.
    pub backoff_max: Duration,
    /// After throttling: the first retry's window and every later one's.
    /// `None`: throttling backs off like any other failure.
    pub throttled: Option<(Duration, Duration)>,
    /// Each wait is drawn from the whole backoff (`full` jitter, as AWS
    /// advises for clients sharing a quota) rather than its upper half.
    pub full_jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff_min: ERROR_BACKOFF_MIN,
            backoff_max: ERROR_BACKOFF_MAX,
            throttled: Some((THROTTLED_FIRST_WINDOW, THROTTLED_RETRY_WINDOW)),
            full_jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The backoff after `prev` (the one before, if any) for `error`.
    fn next_backoff(&self, prev: Option<&CachedError>, error: &SourceError) -> Duration {
        let throttled = |e: &CachedError| e.error.kind == super::ErrorKind::Throttled;
        match self.throttled {
            Some((first, then)) if error.kind == super::ErrorKind::Throttled => {
                if prev.is_some_and(throttled) {
                    then
                } else {
                    first
                }
            }
            _ => match prev {
                Some(p) if !(self.throttled.is_some() && throttled(p)) => {
                    (p.backoff * 2).clamp(self.backoff_min, self.backoff_max)
                }
                _ => self.backoff_min,
            },
        }
    }

    /// How long to wait before retrying after `backoff`.
    fn delay(&self, backoff: Duration, rng: &mut impl Rng) -> Duration {
        let low = if self.full_jitter { 0.0 } else { 0.5 };
        backoff.mul_f64(rng.random_range(low..=1.0))
    }
}
/// A failing fetch is retried in the background while a pull has asked for
/// its token within this long (twice kubelet's longest pull back-off).
pub const RETRY_WHILE_WANTED: Duration = Duration::from_secs(10 * 60);
/// Refresh jitter, as a fraction of the time until the refresh.
const REFRESH_JITTER: f64 = 0.1;
/// Upper bound on distinct keys kept (partitions × regions × roles).
const MAX_KEYS: u64 = 1024;

/// Whether a lookup was answered from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A cached token was used.
    Hit,
    /// The caller waited for a fetch (its own or a concurrent one).
    Miss,
}

impl CacheOutcome {
    /// `hit` or `miss`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
        }
    }
}

#[derive(Clone)]
struct Cached {
    credentials: Credentials,
    usable_until: Instant,
    refresh_at: Instant,
    expires_at: SystemTime,
}

#[derive(Clone)]
struct CachedError {
    error: SourceError,
    retry_at: Instant,
    backoff: Duration,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    error: Option<CachedError>,
    refreshing: bool,
    warned_expired: bool,
    /// A fetch (and its retries) is running for pulls that have no token.
    fetching: bool,
    /// The last failure of the running fetch, for pulls that stop waiting.
    fetch_error: Option<SourceError>,
    /// When a pull last asked for this token.
    wanted: Option<Instant>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<State>,
    fetch: Arc<tokio::sync::Mutex<()>>,
    /// Woken after each attempt of a running fetch.
    changed: tokio::sync::Notify,
}

/// Ends a slot's fetch however its task ends (even by a panic), so that no
/// pull waits for a fetch that is gone.
struct FetchDone<'a>(&'a Slot);

impl Drop for FetchDone<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.fetching = false;
        }
        self.0.changed.notify_waiters();
    }
}

/// What a pull without a usable token does next.
enum Next {
    Token(Credentials),
    Fail(SourceError),
    /// A fetch is running; `Some` once one of its attempts has failed.
    Wait(Option<SourceError>),
    Start,
}

/// What a lookup finds without waiting.
enum Peek {
    Token(Credentials, bool),
    Error(SourceError),
    Nothing,
}

impl Slot {
    fn peek(&self, now: Instant) -> Peek {
        let mut st = self.state.lock().expect("token state lock");
        st.wanted = Some(now);
        let error_fresh = st.error.as_ref().is_some_and(|e| now < e.retry_at);
        if let Some(t) = &st.token {
            if now < t.usable_until {
                let credentials = t.credentials.clone();
                let refresh = now >= t.refresh_at && !st.refreshing && !error_fresh;
                if refresh {
                    st.refreshing = true;
                }
                return Peek::Token(credentials, refresh);
            }
        }
        match &st.error {
            Some(e) if error_fresh && !st.fetching => Peek::Error(e.error.clone()),
            _ => Peek::Nothing,
        }
    }

    fn next(&self, now: Instant) -> Next {
        let mut st = self.state.lock().expect("token state lock");
        if let Some(t) = &st.token {
            if now < t.usable_until {
                return Next::Token(t.credentials.clone());
            }
        }
        if st.fetching {
            return Next::Wait(st.fetch_error.clone());
        }
        if let Some(e) = &st.error {
            if now < e.retry_at {
                return Next::Fail(e.error.clone());
            }
        }
        st.fetching = true;
        st.fetch_error = None;
        Next::Start
    }
}

/// The cache. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct TokenCache {
    source: Arc<dyn CredentialSource>,
    slots: moka::sync::Cache<TokenKey, Arc<Slot>>,
    max_age: Option<Duration>,
    retry: RetryPolicy,
    /// Where retry and refresh jitter is drawn from: the OS's entropy, or a
    /// seed (the fleet simulation and tests replay a node with it).
    jitter: Arc<Mutex<StdRng>>,
    metrics: Arc<Metrics>,
}

impl TokenCache {
    /// A cache in front of `source`; `max_age` caps how long any token is
    /// used (kubelet's `defaultCacheDuration`, when imported).
    pub fn new(
        source: Arc<dyn CredentialSource>,
        max_age: Option<Duration>,
        metrics: Arc<Metrics>,
    ) -> Self {
        TokenCache {
            source,
            slots: moka::sync::Cache::new(MAX_KEYS),
            max_age,
            retry: RetryPolicy::default(),
            jitter: Arc::new(Mutex::new(StdRng::from_os_rng())),
            metrics,
        }
    }

    /// The same cache drawing its jitter from a sequence seeded with
    /// `seed`, so that a run can be replayed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.jitter = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        self
    }

    /// The same cache with another retry policy (the fleet simulation
    /// compares policies with it).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets `token_expiry_seconds` from the tokens cached now (called at
    /// scrape time).
    pub fn export_expiries(&self) {
        let family = &self.metrics.token_expiry;
        family.clear();
        let now = SystemTime::now();
        for (key, expires_at) in self.expiries() {
            let seconds = match expires_at.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            let labels = TokenLabels {
                service: match key.service {
                    EcrService::Private => "ecr",
                    EcrService::Public => "ecr-public",
                },
                partition: key.partition,
                region: key.region.clone(),
                variant: key.variant.to_string(),
                role: key.role.as_ref().map(|r| r.arn.clone()).unwrap_or_default(),
            };
            family.get_or_create(&labels).set(seconds);
        }
    }

    /// Credentials for `key`: cached, or fetched once for all concurrent
    /// callers. After a fetch fails for a passing reason, waits up to `wait`
    /// for its retries before returning the error.
    pub async fn get(
        &self,
        key: &TokenKey,
        wait: Duration,
    ) -> Result<(Credentials, CacheOutcome), SourceError> {
        let slot = self
            .slots
            .get_with_by_ref(key, || Arc::new(Slot::default()));
        match slot.peek(Instant::now()) {
            Peek::Token(credentials, refresh) => {
                self.metrics.cache_hits.inc();
                if refresh {
                    self.spawn_refresh(key.clone(), slot);
                }
                return Ok((credentials, CacheOutcome::Hit));
            }
            Peek::Error(e) => return Err(e),
            Peek::Nothing => {}
        }
        self.metrics.cache_misses.inc();
        // The first attempt is always waited for (it is bounded by the AWS
        // timeout); after a passing failure, its retries for up to `wait`.
        let mut deadline = None;
        loop {
            let changed = slot.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            match slot.next(now) {
                Next::Token(credentials) => return Ok((credentials, CacheOutcome::Miss)),
                Next::Fail(e) => return Err(e),
                Next::Start => {
                    self.spawn_fetch(key.clone(), slot.clone());
                    continue;
                }
                Next::Wait(None) => {}
                Next::Wait(Some(e)) => {
                    let until = *deadline.get_or_insert(now + wait);
                    if now >= until {
                        return Err(e);
                    }
                }
            }
            match deadline {
                Some(until) => {
                    let _ = tokio::time::timeout_at(until, changed).await;
                }
                None => changed.await,
            }
        }
    }

    /// Fetches for pulls that have no token, in a task of its own so that a
    /// pull that gives up does not cancel it. A passing failure is retried
    /// on the error backoff, with jitter, while pulls keep asking.
    fn spawn_fetch(&self, key: TokenKey, slot: Arc<Slot>) {
        let this = self.clone();
        tokio::spawn(async move {
            let _guard = slot.fetch.clone().lock_owned().await;
            let _done = FetchDone(&slot);
            // Queued behind a refresh that has stored a usable token: the
            // pulls waiting take that one; no second call.
            let stored = {
                let st = slot.state.lock().expect("token state lock");
                st.token
                    .as_ref()
                    .is_some_and(|t| Instant::now() < t.usable_until)
            };
            if stored {
                return;
            }
            loop {
                let result = this.fetch_and_store(&key, &slot).await;
                let retry_in = {
                    let mut st = slot.state.lock().expect("token state lock");
                    let retry_in = match &result {
                        Err(e) if e.kind.is_transient() => st
                            .wanted
                            .filter(|w| w.elapsed() < RETRY_WHILE_WANTED)
                            .and(st.error.as_ref())
                            .map(|e| this.retry.delay(e.backoff, &mut *this.draw())),
                        _ => None,
                    };
                    st.fetch_error = result.as_ref().err().cloned();
                    retry_in
                };
                // Done: `FetchDone` ends the fetch and wakes the waiters.
                let Some(delay) = retry_in else { break };
                slot.changed.notify_waiters();
                if let Err(e) = &result {
                    tracing::warn!(
                        key = %key,
                        error = e as &dyn std::error::Error,
                        retry_in_ms = delay.as_millis() as u64,
                        "ECR token fetch failed; retrying while pulls wait for it"
                    );
                }
                tokio::time::sleep(delay).await;
            }
        });
    }

    fn spawn_refresh(&self, key: TokenKey, slot: Arc<Slot>) {
        self.metrics.cache_refreshes.inc();
        let this = self.clone();
        tokio::spawn(async move {
            let _guard = slot.fetch.clone().lock_owned().await;
            match this.fetch_and_store(&key, &slot).await {
                Ok(_) => tracing::debug!(key = %key, "token refreshed in the background"),
                Err(e) => tracing::warn!(
                    key = %key,
                    error = &e as &dyn std::error::Error,
                    "background token refresh failed; the cached token keeps serving"
                ),
            }
            slot.state.lock().expect("token state lock").refreshing = false;
        });
    }

    async fn fetch_and_store(
        &self,
        key: &TokenKey,
        slot: &Slot,
    ) -> Result<Credentials, SourceError> {
        let started = Instant::now();
        let result = self.source.fetch(key).await;
        let now = Instant::now();
        let api = match key.service {
            EcrService::Private => "ecr:GetAuthorizationToken",
            EcrService::Public => "ecr-public:GetAuthorizationToken",
        };
        let code = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.code.clone().unwrap_or_else(|| format!("{:?}", e.kind)),
        };
        self.metrics.observe_aws(api, code, now - started);
        let mut st = slot.state.lock().expect("token state lock");
        match result {
            Ok(token) => {
                let cached = self.admit(key, token, now, &mut st.warned_expired);
                tracing::debug!(
                    key = %key,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    valid_for_s = cached.usable_until.saturating_duration_since(now).as_secs(),
                    "fetched ECR token"
                );
                let credentials = cached.credentials.clone();
                st.token = Some(cached);
                st.error = None;
                Ok(credentials)
            }
            Err(error) => {
                let backoff = self.retry.next_backoff(st.error.as_ref(), &error);
                st.error = Some(CachedError {
                    error: error.clone(),
                    retry_at: now + backoff,
                    backoff,
                });
                Err(error)
            }
        }
    }

    fn draw(&self) -> std::sync::MutexGuard<'_, StdRng> {
        self.jitter.lock().expect("jitter lock")
    }

    /// Decides how long a fresh token is used and when it is renewed.
    fn admit(&self, key: &TokenKey, token: Token, now: Instant, warned: &mut bool) -> Cached {
        let lifetime = token.expires_at.duration_since(SystemTime::now()).ok();
        let mut usable = match lifetime {
            Some(l) if l > EXPIRY_MARGIN + EXPIRED_ON_ARRIVAL_TTL => l - EXPIRY_MARGIN,
            _ => {
                // Clock skew, or an emulator: use it for this pull but do not
                // trust it for long.
                if !*warned {
                    *warned = true;
                    tracing::warn!(
                        key = %key,
                        expires_at = %humantime::format_rfc3339_seconds(token.expires_at),
                        "ECR token arrived expired or about to expire (clock skew?); using it for at most {}s",
                        EXPIRED_ON_ARRIVAL_TTL.as_secs()
                    );
                }
                EXPIRED_ON_ARRIVAL_TTL
            }
        };
        if let Some(max) = self.max_age {
            usable = usable.min(max);
        }
        let half = usable / 2;
        let jitter = half.mul_f64(
            self.draw()
                .random_range(-REFRESH_JITTER..=REFRESH_JITTER)
                .abs(),
        );
        Cached {
            credentials: token.credentials,
            usable_until: now + usable,
            refresh_at: now + half - jitter,
            expires_at: token.expires_at,
        }
    }

    /// ECR's `expiresAt` of each cached token, by key.
    pub fn expiries(&self) -> Vec<(TokenKey, SystemTime)> {
        self.slots
            .iter()
            .filter_map(|(k, slot)| {
                let st = slot.state.lock().expect("token state lock");
                st.token.as_ref().map(|t| ((*k).clone(), t.expires_at))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecr::{EndpointVariant, ErrorKind};
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A source that counts calls, waits `delay`, and answers from a script.
    struct Scripted {
        calls: AtomicUsize,
        delay: Duration,
        valid_for: Mutex<Option<Duration>>,
        fail: Mutex<Option<ErrorKind>>,
    }

    impl Scripted {
        fn new(delay: Duration, valid_for: Option<Duration>) -> Arc<Self> {
            Arc::new(Scripted {
                calls: AtomicUsize::new(0),
                delay,
                valid_for: Mutex::new(valid_for),
                fail: Mutex::new(None),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn fail_with(&self, kind: Option<ErrorKind>) {
            *self.fail.lock().unwrap() = kind;
        }
    }

    impl CredentialSource for Scripted {
        fn fetch(&self, _key: &TokenKey) -> BoxFuture<'static, Result<Token, SourceError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = self.delay;
            let fail = *self.fail.lock().unwrap();
            let valid_for = *self.valid_for.lock().unwrap();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if let Some(kind) = fail {
                    return Err(SourceError::new(
                        kind,
                        Some("Scripted".into()),
                        "scripted failure",
                    ));
                }
                let expires_at = match valid_for {
                    Some(d) => SystemTime::now() + d,
                    None => SystemTime::now() - Duration::from_secs(3600),
                };
                Ok(Token {
                    credentials: Credentials {
                        username: "AWS".into(),
                        password: format!("pw-{n}"),
                    },
                    expires_at,
                })
            })
        }
    }

    fn key() -> TokenKey {
        TokenKey {
            service: crate::ecr::EcrService::Private,
            partition: "aws",
            region: "us-east-1".into(),
            variant: EndpointVariant::default(),
            role: None,
        }
    }

    const TWELVE_HOURS: Duration = Duration::from_secs(12 * 3600);

    /// Each test draws its jitter from one seeded sequence, so a run can be
    /// replayed: `CACHE_TEST_SEED=N cargo test --lib ecr::cache`. The
    /// assertions hold for any draw the reasoning beside them allows.
    fn seed() -> u64 {
        match std::env::var("CACHE_TEST_SEED") {
            Err(_) => 1,
            Ok(s) => s
                .parse()
                .unwrap_or_else(|e| panic!("CACHE_TEST_SEED={s:?} is not a u64: {e}")),
        }
    }

    fn cache_over(source: Arc<Scripted>) -> TokenCache {
        TokenCache::new(source, None, Arc::default()).with_seed(seed())
    }

    #[tokio::test(start_paused = true)]
    async fn hundred_concurrent_misses_make_one_call() {
        let source = Scripted::new(Duration::from_millis(200), Some(TWELVE_HOURS));
        let cache = cache_over(source.clone());
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&key(), Duration::ZERO).await })
            })
            .collect();
        for t in tasks {
            let (c, _) = t.await.unwrap().unwrap();
            assert_eq!(c.password, "pw-1");
        }
        assert_eq!(source.calls(), 1);
    }

    /// A pull whose token ran out while a (slow) refresh was running queues
    /// its fetch behind the refresh; when the refresh stores a token, the
    /// pull takes it and no second call is made.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_queued_behind_a_successful_refresh_makes_no_call() {
        let source = Scripted::new(Duration::from_secs(7 * 3600), Some(TWELVE_HOURS));
        let cache = cache_over(source.clone());
        cache.get(&key(), Duration::ZERO).await.unwrap();
        assert_eq!(source.calls(), 1);
        // Past the refresh point: a hit starts the (7 h) refresh.
        tokio::time::advance(Duration::from_secs(6 * 3600 + 1)).await;
        cache.get(&key(), Duration::ZERO).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(source.calls(), 2);
        // Past the token's usable life, the refresh still running: the pull
        // waits for a fetch, which queues behind the refresh.
        tokio::time::advance(Duration::from_secs(6 * 3600)).await;
        let (c, outcome) = cache.get(&key(), Duration::ZERO).await.unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
        assert_eq!(c.password, "pw-2", "the refresh's token");
        assert_eq!(source.calls(), 2, "the queued fetch called AWS again");
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_happens_ahead_and_no_caller_waits() {
        let source = Scripted::new(Duration::from_secs(2), Some(TWELVE_HOURS));
        let cache = cache_over(source.clone());
        let (_, outcome) = cache.get(&key(), Duration::ZERO).await.unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
        // Past the latest possible refresh point (half the usable life plus
        // jitter), but well before expiry.
        tokio::time::advance(Duration::from_secs(6 * 3600 + 1)).await;
        let before = Instant::now();
        let (c, outcome) = cache.get(&key(), Duration::ZERO).await.unwrap();
        assert_eq!((c.password.as_str(), outcome), ("pw-1", CacheOutcome::Hit));
        assert_eq!(Instant::now(), before, "a hit must not wait on the source");
        // Let the background refresh finish; the next lookup sees the new token.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(source.calls(), 2);
        let (c, outcome) = cache.get(&key(), Duration::ZERO).await.unwrap();
        assert_eq!((c.password.as_str(), outcome), ("pw-2", CacheOutcome::Hit));
        assert_eq!(cache.metrics.cache_refreshes.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_back_off_exponentially() {
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        source.fail_with(Some(ErrorKind::AccessDenied));
        let cache = cache_over(source.clone());
        // Hammer the cache for 100 s at 100 lookups per second.
        for _ in 0..10_000 {
            let e = cache.get(&key(), Duration::ZERO).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::AccessDenied);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // Backoff 1, 2, 4, 8, 16, 32, 60: calls at t=0,1,3,7,15,31,63 → 7.
        assert_eq!(source.calls(), 7);
        // Recovery: after the backoff, a success clears the error.
        source.fail_with(None);
        tokio::time::advance(ERROR_BACKOFF_MAX).await;
        assert!(cache.get(&key(), Duration::ZERO).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_on_arrival_serves_the_pull_and_is_kept_at_most_a_minute() {
        let source = Scripted::new(Duration::ZERO, None);
        let cache = cache_over(source.clone());
        assert_eq!(
            cache.get(&key(), Duration::ZERO).await.unwrap().0.password,
            "pw-1"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(
            cache.get(&key(), Duration::ZERO).await.unwrap().1,
            CacheOutcome::Hit
        );
        assert_eq!(source.calls(), 1);
        tokio::time::advance(EXPIRED_ON_ARRIVAL_TTL).await;
        cache.get(&key(), Duration::ZERO).await.unwrap();
        assert!(
            source.calls() >= 2,
            "a token expired on arrival must not be kept past 60 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_token_keeps_serving_while_the_source_fails() {
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        let cache = cache_over(source.clone());
        cache.get(&key(), Duration::ZERO).await.unwrap();
        source.fail_with(Some(ErrorKind::Network));
        // Into the refresh window: every refresh fails, pulls keep working.
        for _ in 0..600 {
            tokio::time::advance(Duration::from_secs(60)).await;
            let (c, outcome) = cache.get(&key(), Duration::ZERO).await.unwrap();
            assert_eq!((c.password.as_str(), outcome), ("pw-1", CacheOutcome::Hit));
            tokio::task::yield_now().await;
        }
        // 10 h in; refreshes started after ~6 h, at most one per backoff.
        let calls = source.calls();
        assert!((2..=300).contains(&calls), "calls = {calls}");
    }

    #[tokio::test(start_paused = true)]
    async fn max_age_caps_how_long_a_token_is_used() {
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        let cache = TokenCache::new(
            source.clone(),
            Some(Duration::from_secs(3600)),
            Arc::default(),
        );
        cache.get(&key(), Duration::ZERO).await.unwrap();
        tokio::time::advance(Duration::from_secs(3601)).await;
        let (c, outcome) = cache.get(&key(), Duration::ZERO).await.unwrap();
        assert_eq!((c.password.as_str(), outcome), ("pw-2", CacheOutcome::Miss));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_does_not_cancel_the_fetch() {
        let source = Scripted::new(Duration::from_secs(5), Some(TWELVE_HOURS));
        let cache = cache_over(source.clone());
        let first =
            tokio::time::timeout(Duration::from_secs(1), cache.get(&key(), Duration::ZERO)).await;
        assert!(first.is_err());
        let (c, _) = cache.get(&key(), Duration::ZERO).await.unwrap();
        assert_eq!(c.password, "pw-1");
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_failure_is_retried_while_the_pull_waits() {
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        source.fail_with(Some(ErrorKind::Network));
        let cache = cache_over(source.clone());
        // Longer than the longest backoff, so the pull outlasts any draw.
        let wait = ERROR_BACKOFF_MAX * 2;
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key(), wait).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished(), "the pull waits for the retries");
        // Backoff 1, 2, 4 s, each wait drawn from the whole of it: the third
        // attempt comes by 3 s; more than nine in 5 s would take draws
        // that together come up less than once in a million runs.
        let failed = source.calls();
        assert!((3..=9).contains(&failed), "{failed}");
        source.fail_with(None);
        let started = Instant::now();
        let (c, outcome) = waiting.await.unwrap().unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
        assert_eq!(c.password, format!("pw-{}", failed + 1), "the next retry");
        // After the n-th failure the backoff is 2^(n-1) s, so the next retry
        // comes within that of the last failure, which was before the flip.
        let backoff = (ERROR_BACKOFF_MIN * (1 << (failed - 1))).min(ERROR_BACKOFF_MAX);
        assert!(
            started.elapsed() <= backoff,
            "{:?} after the flip, backoff {backoff:?}",
            started.elapsed()
        );
        // A pull that asks later is a hit.
        assert_eq!(
            cache.get(&key(), Duration::ZERO).await.unwrap().1,
            CacheOutcome::Hit
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_retries_once_per_window_and_a_waiting_pull_gets_the_first_token() {
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        source.fail_with(Some(ErrorKind::Throttled));
        let cache = cache_over(source.clone());
        let pull = {
            let cache = cache.clone();
            move || {
                let cache = cache.clone();
                async move { cache.get(&key(), Duration::ZERO).await }
            }
        };
        assert_eq!(pull().await.unwrap_err().kind, ErrorKind::Throttled);
        // Pulls keep asking for ten minutes (every 30 s, as kubelet's
        // back-off ends up doing): one retry within the first window, then
        // one per later window, each at a random moment of it, however
        // often they ask.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let _ = pull().await;
        }
        let calls = source.calls();
        let later = 600 - THROTTLED_FIRST_WINDOW.as_secs();
        let at_least = 2 + (later / THROTTLED_RETRY_WINDOW.as_secs()) as usize;
        assert!((at_least..=16).contains(&calls), "{calls}");

        // A pull waiting through the throttling gets the token at the first
        // retry after AWS answers again, within one window.
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        source.fail_with(Some(ErrorKind::Throttled));
        let cache = cache_over(source.clone());
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key(), THROTTLED_FIRST_WINDOW * 2).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The first retry may fall within that second (1 in 300); the next
        // then comes within the shorter later window.
        let before = source.calls();
        assert!((1..=2).contains(&before), "{before}");
        source.fail_with(None);
        let started = Instant::now();
        let (_, outcome) = waiting.await.unwrap().unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
        assert!(started.elapsed() <= THROTTLED_FIRST_WINDOW);
        assert_eq!(source.calls(), before + 1, "served by the first retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_with_the_last_error_and_lasting_failures_are_not_retried() {
        const WAIT: Duration = Duration::from_secs(10);
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        source.fail_with(Some(ErrorKind::Network));
        let cache = cache_over(source.clone());
        let started = Instant::now();
        let e = cache.get(&key(), WAIT).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Network);
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        // Access denied does not pass by itself: one call, no waiting.
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        source.fail_with(Some(ErrorKind::AccessDenied));
        let cache = cache_over(source.clone());
        let started = Instant::now();
        assert_eq!(
            cache.get(&key(), WAIT).await.unwrap_err().kind,
            ErrorKind::AccessDenied
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn background_retries_stop_once_no_pull_asks() {
        let source = Scripted::new(Duration::ZERO, Some(TWELVE_HOURS));
        source.fail_with(Some(ErrorKind::Network));
        let cache = cache_over(source.clone());
        assert!(cache.get(&key(), Duration::ZERO).await.is_err());
        tokio::time::sleep(RETRY_WHILE_WANTED + ERROR_BACKOFF_MAX).await;
        let after_window = source.calls();
        // 1, 2, 4 ... 60 s backoff (full jitter) over ten minutes.
        assert!((8..=45).contains(&after_window), "{after_window}");
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            source.calls(),
            after_window,
            "no pull asked: retries stopped"
        );
    }
}
