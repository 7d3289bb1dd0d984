//! The importer: re-resolves the sources of scheduled tags (`tag set --scheduled`) every
//! interval, with jitter so that many tags do not fire together, bounded by a global and a
//! per-registry concurrency limit. A failure is recorded as the tag's import condition and
//! retried with exponential backoff (capped at the interval); the tag keeps its digest.
//! Changes flow through [`StreamService::scheduled_import`], so they become events like any
//! other.

use crate::stream::reference::TagRef;
use crate::stream::service::StreamService;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

/// Default interval of a scheduled tag.
pub const DEFAULT_INTERVAL_SECS: u64 = 15 * 60;
/// Shortest interval accepted by default.
pub const DEFAULT_MIN_INTERVAL_SECS: u64 = 30;
/// Imports running at once, node-wide.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Imports running at once against one registry.
pub const DEFAULT_REGISTRY_CONCURRENCY: usize = 2;
/// First retry delay after a failure; doubled per consecutive failure.
pub const RETRY_BASE: Duration = Duration::from_secs(5);
/// How often the schedule is looked at.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct ImporterSettings {
    pub concurrency: usize,
    pub registry_concurrency: usize,
}

/// A deterministic spread in `[0, 1)` per tag, so restarts keep the same phase.
fn phase(key: &str) -> f64 {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % 10_000) as f64 / 10_000.0
}

/// The registry host of a source reference (for the per-registry limit).
fn registry_of(source: &str) -> String {
    crate::registry::RegistryClient::parse(source)
        .map(|r| r.registry().to_string())
        .unwrap_or_else(|_| "local".to_string())
}

/// Runs scheduled imports until `shutdown`, while `leader` says this node is the one that
/// imports (always, with the embedded store; the elected node, with etcd).
pub async fn run(
    streams: Arc<StreamService>,
    settings: ImporterSettings,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let global = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut per_registry: HashMap<String, Arc<Semaphore>> = HashMap::new();
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut running: HashSet<String> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Duration)>();
    let view = streams.view();
    loop {
        if !*leader.borrow_and_update() {
            // Another node imports: forget the schedule (a new term starts afresh) and wait.
            due.clear();
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
            continue;
        }
        let now = Instant::now();
        let snapshot = view.load();
        let mut scheduled: HashSet<String> = HashSet::new();
        for stream in snapshot.streams() {
            for tag in stream.tags.values() {
                let Some(schedule) = tag.schedule else {
                    continue;
                };
                // A source by digest never moves: nothing to follow.
                if tag.source.contains("@sha256:") {
                    continue;
                }
                let key = format!("{}/{}:{}", stream.namespace, stream.name, tag.name);
                scheduled.insert(key.clone());
                let interval = Duration::from_secs(schedule.interval_secs.max(1));
                let when = *due
                    .entry(key.clone())
                    .or_insert_with(|| now + interval.mul_f64(phase(&key)));
                if when > now || running.contains(&key) {
                    continue;
                }
                running.insert(key.clone());
                let registry = registry_of(&tag.source);
                let limit = per_registry
                    .entry(registry)
                    .or_insert_with(|| {
                        Arc::new(Semaphore::new(settings.registry_concurrency.max(1)))
                    })
                    .clone();
                let (global, streams, done, failures_before) = (
                    global.clone(),
                    streams.clone(),
                    done_tx.clone(),
                    tag.condition.as_ref().map_or(0, |c| c.consecutive_failures),
                );
                let t = TagRef {
                    namespace: stream.namespace.clone(),
                    name: stream.name.clone(),
                    tag: tag.name.clone(),
                };
                tokio::spawn(async move {
                    let next = {
                        // The registry's permit first: a task waiting for a busy registry
                        // must not hold a global permit other registries' checks need.
                        let _r = limit.acquire().await;
                        let _g = global.acquire().await;
                        match streams.scheduled_import(&t).await {
                            Ok(c) if c.consecutive_failures == 0 => interval,
                            Ok(c) => backoff(c.consecutive_failures, interval),
                            Err(e) => {
                                tracing::warn!(tag = %t, error = %e, "scheduled import could not run");
                                backoff(failures_before + 1, interval)
                            }
                        }
                    };
                    let _ = done.send((key, next));
                });
            }
        }
        due.retain(|k, _| scheduled.contains(k) || running.contains(k));
        // Until the next tick, only record finished checks: the scan above is the costly
        // part (every tag), so it runs once per tick, not once per finished check.
        let tick = tokio::time::sleep(TICK);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = &mut tick => break,
                _ = leader.changed() => break,
                Some((key, next)) = done_rx.recv() => {
                    running.remove(&key);
                    // ±10 % jitter keeps tags that started together from staying together.
                    let jitter = 0.9 + 0.2 * phase(&format!("{key}{:?}", Instant::now()));
                    due.insert(key, Instant::now() + next.mul_f64(jitter));
                }
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Moves tags that follow other stream tags whenever those move (set, import, rollback,
/// follow), until `shutdown`. Like imports, only on the node `leader` names: with etcd every
/// node sees every event, and one of them moving the followers is enough.
pub async fn follow(
    streams: Arc<StreamService>,
    leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = streams.view().events();
    loop {
        let e = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match e {
            Ok(e) if e.new_digest.is_some() && *leader.borrow() => {
                let moved = TagRef {
                    namespace: e.namespace,
                    name: e.stream,
                    tag: e.tag,
                };
                if let Err(err) = streams.propagate(&moved).await {
                    tracing::warn!(tag = %moved, error = %err, "cannot move the tags that follow this one");
                }
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::error!(missed = n, "the follower fell behind; following tags may lag until their source moves again");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The delay before retrying after `failures` consecutive failures.
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(interval)
}

/// Parses `90s`, `15m`, `2h`, or a number of seconds.
pub fn parse_interval(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid interval {text:?}: expected e.g. 30s, 15m, 1h"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(format!(
                "invalid interval {text:?}: the unit must be s, m or h"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("invalid interval {text:?}: must be more than 0")),
        Some(secs) => Ok(secs),
        None => Err(format!("invalid interval {text:?}: too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_backoff() {
        assert_eq!(parse_interval("15m"), Ok(900));
        assert_eq!(parse_interval("30s"), Ok(30));
        assert_eq!(parse_interval("2h"), Ok(7200));
        assert_eq!(parse_interval("45"), Ok(45));
        assert!(parse_interval("5d").is_err());
        assert!(parse_interval("m").is_err());
        assert!(parse_interval("0s").is_err());
        let i = Duration::from_secs(60);
        assert_eq!(backoff(1, i), Duration::from_secs(5));
        assert_eq!(backoff(2, i), Duration::from_secs(10));
        assert_eq!(backoff(10, i), i);
        let p = phase("team-a/app:prod");
        assert!((0.0..1.0).contains(&p));
        assert_eq!(p, phase("team-a/app:prod"));
    }
}
