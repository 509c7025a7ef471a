//! L2: the fleet's Redis, one server or a cluster, behind a breaker and a short timeout per call.
//! Every method returns `None` (or does nothing) when Redis is slow, down or refusing: the cache
//! fails open.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::breaker::Breaker;
use super::{CacheConfig, CacheError, CacheKey, CacheMetrics, Clock};

/// Where to connect.
enum Target {
    Single(redis::Client),
    // Boxed: the cluster client is twice the single one, and built once per store.
    Cluster(Box<ClusterClient>),
}

/// A live connection of either kind; both multiplex, so clones are cheap and concurrent.
#[derive(Clone)]
enum Conn {
    Single(Box<ConnectionManager>),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Result of looking a key up.
#[derive(Debug, Default)]
pub struct Lookup {
    /// The raw value, when one was asked for and present.
    pub value: Option<Vec<u8>>,
    /// Asks counted for this key in the current hot window, this one included; `None` when the
    /// count failed (then nothing is written: the answer is not known to be hot).
    pub count: Option<u64>,
}

/// Adds `n` asks to the count under `cnt`; a count this call created expires after the hot
/// window (`window` seconds). Returns the count after it.
async fn count_ask(c: &mut Conn, cnt: &str, n: u64, window: u64) -> RedisResult<u64> {
    let total: u64 = redis::cmd("INCRBY").arg(cnt).arg(n).query_async(c).await?;
    if total == n {
        redis::cmd("EXPIRE")
            .arg(cnt)
            .arg(window)
            .query_async::<()>(c)
            .await?;
    }
    Ok(total)
}

/// The Redis level. Connects lazily on first use and after failures.
pub struct L2 {
    target: Target,
    conn: Mutex<Option<Conn>>,
    connecting: tokio::sync::Mutex<()>,
    breaker: Breaker,
    timeout: Duration,
    prefix: String,
    hot_window_secs: u64,
    hot_set_max: usize,
    hot_threshold: u64,
    metrics: CacheMetrics,
}

impl L2 {
    /// Parses `url` (see `CacheConfig::redis_url`); connects nothing yet. The breaker's cooldown
    /// runs on `clock`.
    pub fn new(
        url: &str,
        config: &CacheConfig,
        metrics: CacheMetrics,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CacheError> {
        let invalid = |e: redis::RedisError| CacheError::InvalidRedisUrl {
            url: mask_password(url),
            reason: e.to_string(),
        };
        let target = match cluster_nodes(url) {
            Some(nodes) => Target::Cluster(Box::new(
                ClusterClient::builder(nodes)
                    .connection_timeout(config.redis_timeout)
                    .response_timeout(config.redis_timeout)
                    .retries(1)
                    .build()
                    .map_err(invalid)?,
            )),
            None => Target::Single(redis::Client::open(url).map_err(invalid)?),
        };
        Ok(Self {
            target,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown, clock),
            timeout: config.redis_timeout,
            prefix: config.key_prefix.clone(),
            hot_window_secs: config.hot_window.as_secs().max(1),
            hot_set_max: config.hot_set_max,
            hot_threshold: config.hot_threshold,
            metrics,
        })
    }

    fn answer_key(&self, key: &CacheKey) -> String {
        format!("{}:ans:{}", self.prefix, key.to_hex())
    }

    fn count_key(&self, key: &CacheKey) -> String {
        format!("{}:cnt:{}", self.prefix, key.to_hex())
    }

    fn variants_key(&self, key: &CacheKey) -> String {
        format!("{}:var:{}", self.prefix, key.to_hex())
    }

    fn hot_key(&self) -> String {
        format!("{}:hot", self.prefix)
    }

    /// Reads the value (when `read`) and counts one ask (when `count`), in one round trip.
    pub async fn lookup(&self, key: &CacheKey, read: bool, count: bool) -> Lookup {
        let (ans, cnt, window) = (
            self.answer_key(key),
            self.count_key(key),
            self.hot_window_secs,
        );
        let (hot, member, threshold) = (self.hot_key(), key.to_hex(), self.hot_threshold);
        self.call(move |mut c| async move {
            let mut c2 = c.clone();
            let get = async {
                if read {
                    redis::cmd("GET").arg(&ans).query_async(&mut c).await
                } else {
                    Ok(None)
                }
            };
            let incr = async {
                if !count {
                    return Ok(None);
                }
                let n = count_ask(&mut c2, &cnt, 1, window).await?;
                if n >= threshold {
                    // Keep the hot set's score current for answers already stored (XX: never
                    // adds a key that has no value).
                    redis::cmd("ZADD")
                        .arg(&hot)
                        .arg("XX")
                        .arg(n)
                        .arg(&member)
                        .query_async::<()>(&mut c2)
                        .await?;
                }
                Ok(Some(n))
            };
            let (value, count) = tokio::try_join!(get, incr)?;
            Ok(Lookup { value, count })
        })
        .await
        .unwrap_or_default()
    }

    /// Adds asks that L1 answered (`n` per key) to the keys' counts, concurrently, in one
    /// call; returns each count after it, or `None` when Redis failed (then nothing is known
    /// to be hot). Same window and hot-set upkeep as [`L2::lookup`].
    pub async fn count_asks(&self, asks: &[(CacheKey, u64)]) -> Option<Vec<u64>> {
        let asks: Vec<(String, String, u64)> = asks
            .iter()
            .map(|(k, n)| (self.count_key(k), k.to_hex(), *n))
            .collect();
        let (hot, window, threshold) = (self.hot_key(), self.hot_window_secs, self.hot_threshold);
        self.call(move |c| async move {
            let one = |(cnt, member, n): &(String, String, u64)| {
                let (mut c, hot) = (c.clone(), hot.clone());
                let (cnt, member, n) = (cnt.clone(), member.clone(), *n);
                async move {
                    let total = count_ask(&mut c, &cnt, n, window).await?;
                    if total >= threshold {
                        redis::cmd("ZADD")
                            .arg(&hot)
                            .arg("XX")
                            .arg(total)
                            .arg(&member)
                            .query_async::<()>(&mut c)
                            .await?;
                    }
                    Ok::<u64, redis::RedisError>(total)
                }
            };
            futures::future::try_join_all(asks.iter().map(one)).await
        })
        .await
    }

    /// Counts one ask of a sampled question and reads its kept answers, in one round trip.
    /// `None` when Redis failed.
    pub async fn lookup_variants(&self, key: &CacheKey) -> Option<(u64, Vec<Vec<u8>>)> {
        let (cnt, var, window) = (
            self.count_key(key),
            self.variants_key(key),
            self.hot_window_secs,
        );
        self.call(move |mut c| async move {
            let mut c2 = c.clone();
            let read = async {
                redis::cmd("LRANGE")
                    .arg(&var)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
            };
            let incr = count_ask(&mut c2, &cnt, 1, window);
            let (values, n) = tokio::try_join!(read, incr)?;
            Ok((n, values))
        })
        .await
    }

    /// Adds one sampled answer to `key`'s kept answers unless `max` are there already; the
    /// list lives `ttl` from this write. Returns whether it was added.
    pub async fn add_variant(
        &self,
        key: &CacheKey,
        bytes: Vec<u8>,
        ttl: Duration,
        max: usize,
    ) -> bool {
        let var = self.variants_key(key);
        let secs = ttl.as_secs().max(1);
        self.call(move |mut c| async move {
            let len: usize = redis::cmd("RPUSH")
                .arg(&var)
                .arg(bytes)
                .query_async(&mut c)
                .await?;
            // Another node may have added concurrently: keep the first `max`.
            redis::cmd("LTRIM")
                .arg(&var)
                .arg(0)
                .arg(max as i64 - 1)
                .query_async::<()>(&mut c)
                .await?;
            redis::cmd("EXPIRE")
                .arg(&var)
                .arg(secs)
                .query_async::<()>(&mut c)
                .await?;
            Ok(len <= max)
        })
        .await
        .unwrap_or(false)
    }

    /// Removes one kept sampled answer that failed a check.
    pub async fn remove_variant(&self, key: &CacheKey, bytes: Vec<u8>) {
        let var = self.variants_key(key);
        self.call(move |mut c| async move {
            redis::cmd("LREM")
                .arg(&var)
                .arg(0)
                .arg(bytes)
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    }

    /// Plain read of the value under `key` (prewarm).
    pub async fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        let ans = self.answer_key(key);
        self.call(move |mut c| async move { redis::cmd("GET").arg(&ans).query_async(&mut c).await })
            .await
            .flatten()
    }

    /// Writes a hot answer with `ttl`, and records the key in the hot set with score `count`.
    /// Returns whether the value was written.
    pub async fn store(&self, key: &CacheKey, bytes: Vec<u8>, ttl: Duration, count: u64) -> bool {
        let (ans, hot, member) = (self.answer_key(key), self.hot_key(), key.to_hex());
        let max = self.hot_set_max as i64;
        let secs = ttl.as_secs().max(1);
        self.call(move |mut c| async move {
            redis::cmd("SET")
                .arg(&ans)
                .arg(bytes)
                .arg("EX")
                .arg(secs)
                .query_async::<()>(&mut c)
                .await?;
            redis::cmd("ZADD")
                .arg(&hot)
                .arg(count)
                .arg(&member)
                .query_async::<()>(&mut c)
                .await?;
            // Keep the `max` highest scores.
            redis::cmd("ZREMRANGEBYRANK")
                .arg(&hot)
                .arg(0)
                .arg(-(max + 1))
                .query_async::<()>(&mut c)
                .await
        })
        .await
        .is_some()
    }

    /// Deletes a value that failed a check, and drops it from the hot set.
    pub async fn delete(&self, key: &CacheKey) {
        let (ans, hot, member) = (self.answer_key(key), self.hot_key(), key.to_hex());
        self.call(move |mut c| async move {
            redis::cmd("DEL")
                .arg(&ans)
                .query_async::<()>(&mut c)
                .await?;
            redis::cmd("ZREM")
                .arg(&hot)
                .arg(&member)
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    }

    /// The `k` keys with the highest ask counts (members that are not keys are skipped).
    pub async fn hot_keys(&self, k: usize) -> Vec<CacheKey> {
        if k == 0 {
            return Vec::new();
        }
        let hot = self.hot_key();
        let members: Vec<String> = self
            .call(move |mut c| async move {
                redis::cmd("ZREVRANGE")
                    .arg(&hot)
                    .arg(0)
                    .arg(k as i64 - 1)
                    .query_async(&mut c)
                    .await
            })
            .await
            .unwrap_or_default();
        members
            .iter()
            .filter_map(|m| CacheKey::from_hex(m))
            .collect()
    }

    /// Runs `op` on a connection under the breaker and the timeout; `None` on any failure.
    async fn call<T, F, Fut>(&self, op: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.breaker.allow() {
            self.metrics.redis_skipped.inc();
            self.publish_state();
            return None;
        }
        let result = tokio::time::timeout(self.timeout, async {
            let conn = self.connection().await.map_err(|e| ("connect", e))?;
            op(conn).await.map_err(|e| ("error", e))
        })
        .await;
        let out = match result {
            Ok(Ok(v)) => {
                self.breaker.on_success();
                Some(v)
            }
            Ok(Err((kind, e))) => {
                tracing::debug!(error = %e, kind, "redis call failed");
                self.metrics.redis_errors.with_label_values(&[kind]).inc();
                if kind == "connect"
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                {
                    self.forget_connection();
                }
                self.breaker.on_failure();
                None
            }
            Err(_) => {
                self.metrics
                    .redis_errors
                    .with_label_values(&["timeout"])
                    .inc();
                self.forget_connection();
                self.breaker.on_failure();
                None
            }
        };
        self.publish_state();
        out
    }

    fn publish_state(&self) {
        self.metrics.breaker_state.set(self.breaker.state().gauge());
    }

    /// The shared connection, made on first use. Only one task connects at a time; the others
    /// wait for it (under their own timeout).
    async fn connection(&self) -> RedisResult<Conn> {
        if let Some(c) = self.cached_conn() {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.cached_conn() {
            return Ok(c);
        }
        let conn = match &self.target {
            Target::Single(client) => {
                // One attempt per reconnect: the breaker paces retries, not a backoff loop.
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_connection_timeout(Some(self.timeout));
                Conn::Single(Box::new(
                    ConnectionManager::new_with_config(client.clone(), config).await?,
                ))
            }
            Target::Cluster(client) => Conn::Cluster(client.get_async_connection().await?),
        };
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the shared connection after a connection-level fault, so the next call (the
    /// breaker's probe, typically) connects afresh. Kept, a dead connection fails the first call
    /// after Redis comes back, and the breaker then stays open one more cooldown.
    fn forget_connection(&self) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn cached_conn(&self) -> Option<Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Cluster node URLs when `url` names a cluster: `redis+cluster://h1:p1,h2:p2` or several
/// comma-separated `redis://` URLs.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        return Some(
            rest.split(',')
                .map(|n| format!("redis://{}", n.trim()))
                .collect(),
        );
    }
    if url.contains(',') {
        return Some(url.split(',').map(|n| n.trim().to_string()).collect());
    }
    None
}

fn mask_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_are_recognised() {
        assert_eq!(cluster_nodes("redis://h:1/0"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://a:1,b:2"),
            Some(vec!["redis://a:1".to_string(), "redis://b:2".to_string()])
        );
        assert_eq!(
            cluster_nodes("redis://a:1, redis://b:2"),
            Some(vec!["redis://a:1".to_string(), "redis://b:2".to_string()])
        );
    }

    #[test]
    fn bad_url_is_refused_without_leaking_the_password() {
        let c = CacheConfig::default();
        let clock = Arc::new(crate::cache::SystemClock);
        match L2::new("notredis://user:secret@h", &c, CacheMetrics::new(), clock) {
            Err(CacheError::InvalidRedisUrl { url, .. }) => {
                assert!(!url.contains("secret"), "{url}")
            }
            Err(other) => panic!("expected InvalidRedisUrl, got {other:?}"),
            Ok(_) => panic!("expected InvalidRedisUrl, got Ok"),
        }
    }
}
