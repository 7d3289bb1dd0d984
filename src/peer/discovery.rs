//! Who the peers are.
//!
//! - **Static** (the embedded store): the `peers` config list (`NAME=HOST:PORT`) plus this
//!   node is the cluster, fixed for the daemon's life.
//! - **etcd** (`store = "etcd"`): each node puts `<prefix>peers/<node_name>` → `{"name",
//!   "addr"}` under a lease of `peer_lease_ttl_secs`, keeps it alive every TTL/3, lists the
//!   prefix and watches it from the listing's revision. One key per node and one watch per
//!   node, whatever the number of blobs: placement is computed ([`super::rank`]), never
//!   written. A node that dies leaves the list when its lease expires; one that stops revokes
//!   its lease and leaves at once.
//!
//! With etcd unreachable a node keeps the last member list it had (peers are still there; a
//! dead one costs a refused connection) and registers again when etcd is back.

use super::{Member, Members};
use crate::store::etcd::EtcdStore;
use crate::store::StoreError;
use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;

/// Longest `name=addr` accepted in the static list and in etcd values: a node name is a DNS
/// name (253) and an address at most `[v6]:port`.
pub const MAX_MEMBER_BYTES: usize = 512;
/// Members kept at most (a value a hostile writer could inflate is capped).
pub const MAX_MEMBERS: usize = 10_000;
/// First retry after etcd failed; doubles up to [`crate::store::etcd::MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiscoveryError {
    #[error("peer {0:?} is not NAME=HOST:PORT")]
    BadPeer(String),
    #[error("peer name {0:?} is listed twice")]
    Duplicate(String),
}

/// Checks a node name: what [`super::rank`] hashes and etcd keys carry, so no `/`.
pub fn check_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// `HOST:PORT` with a port.
pub fn check_addr(addr: &str) -> bool {
    addr.len() <= MAX_MEMBER_BYTES
        && addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        && !addr.contains('/')
        && !addr.chars().any(char::is_whitespace)
}

/// Parses one `NAME=HOST:PORT` of the `peers` list.
pub fn parse_member(s: &str) -> Result<Member, DiscoveryError> {
    let bad = || DiscoveryError::BadPeer(s.chars().take(300).collect());
    let (name, addr) = s.split_once('=').ok_or_else(bad)?;
    if !check_name(name) || !check_addr(addr) {
        return Err(bad());
    }
    Ok(Member {
        name: name.to_string(),
        addr: addr.to_string(),
    })
}

/// The static cluster: `me` and the `peers` list (this node's own entry may be listed too,
/// so one list can serve every node).
pub fn static_members(me: &Member, peers: &[String]) -> Result<Members, DiscoveryError> {
    let mut by_name = BTreeMap::new();
    by_name.insert(me.name.clone(), me.clone());
    for p in peers {
        let m = parse_member(p)?;
        if m.name == me.name {
            continue;
        }
        if by_name.insert(m.name.clone(), m.clone()).is_some() {
            return Err(DiscoveryError::Duplicate(m.name));
        }
    }
    Ok(Arc::new(by_name.into_values().collect()))
}

fn peers_prefix(store: &EtcdStore) -> String {
    format!("{}peers/", store.settings().prefix)
}

fn decode(key: &[u8], value: &[u8], prefix: &str) -> Option<Member> {
    if value.len() > MAX_MEMBER_BYTES {
        return None;
    }
    let name = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let m: Member = serde_json::from_slice(value).ok()?;
    (m.name == name && check_name(&m.name) && check_addr(&m.addr)).then_some(m)
}

/// The members registered in etcd now, `me` included: the daemon's first member list, so that
/// a pull right after the start already knows its peers.
pub async fn list_etcd(store: &EtcdStore, me: &Member) -> Result<Members, StoreError> {
    let prefix = peers_prefix(store);
    let p = prefix.clone();
    let listing = store
        .call_any(true, move |mut c| {
            let p = p.clone();
            async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
    let known = members_of(&listing, &prefix, me);
    Ok(Arc::new(known.into_values().collect()))
}

/// The valid members of a listing of the peers prefix (at most [`MAX_MEMBERS`]), `me`
/// included.
fn members_of(
    listing: &etcd_client::GetResponse,
    prefix: &str,
    me: &Member,
) -> BTreeMap<String, Member> {
    let mut known: BTreeMap<String, Member> = listing
        .kvs()
        .iter()
        .filter_map(|kv| decode(kv.key(), kv.value(), prefix))
        .take(MAX_MEMBERS)
        .map(|m| (m.name.clone(), m))
        .collect();
    known.insert(me.name.clone(), me.clone());
    known
}

/// Registers `me` in etcd and keeps `members` up to date until `stop` (then revokes the
/// registration). Never returns early: etcd failures are retried with back-off.
pub async fn run_etcd(
    store: Arc<EtcdStore>,
    me: Member,
    ttl_secs: u64,
    members: watch::Sender<Members>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        if *stop.borrow() {
            return;
        }
        match session(&store, &me, ttl_secs, &members, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                crate::metrics::metrics().peer_discovery_errors.inc();
                tracing::warn!(error = %e, node = %me.name, "peer discovery: etcd failed; keeping the last member list");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                }
                retry = (retry * 2).min(crate::store::etcd::MAX_RETRY);
            }
        }
    }
}

/// One lease's life: register, list, watch, keep alive.
async fn session(
    store: &EtcdStore,
    me: &Member,
    ttl_secs: u64,
    members: &watch::Sender<Members>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let prefix = peers_prefix(store);
    let key = format!("{prefix}{}", me.name);
    let value = serde_json::to_vec(me).map_err(|e| store.unavailable(e))?;
    let mut lease = store.grant_lease(ttl_secs).await?;
    let (id, ttl) = (lease.id, lease.ttl);
    let mut client = lease.client.clone();
    store
        .call(client.put(
            key.as_str(),
            value.clone(),
            Some(PutOptions::new().with_lease(id)),
        ))
        .await?;
    let listing = store
        .call(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await?;
    let mut known = members_of(&listing, &prefix, me);
    publish(members, &known);
    let rev = listing.header().map_or(0, |h| h.revision());
    let mut events = store
        .call(
            client.watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            ),
        )
        .await?;
    tracing::info!(node = %me.name, addr = %me.addr, members = known.len(), ttl, "registered as a peer");
    let mut tick = tokio::time::interval(lease.beat());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = lease.renew(store, "peer registration").await {
                    break Err(e);
                }
            }
            msg = events.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break Err(store.unavailable("peer watch ended")),
                    Err(e) => break Err(store.unavailable(e)),
                };
                if resp.canceled() {
                    break Err(store.unavailable("peer watch cancelled (compacted?)"));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Some(name) = std::str::from_utf8(kv.key()).ok().and_then(|k| k.strip_prefix(prefix.as_str())) else { continue };
                    match ev.event_type() {
                        EventType::Put => {
                            if let Some(m) = decode(kv.key(), kv.value(), &prefix) {
                                if known.len() < MAX_MEMBERS || known.contains_key(&m.name) {
                                    known.insert(m.name.clone(), m);
                                }
                            }
                        }
                        EventType::Delete => {
                            if name == me.name {
                                // Our key went away (deleted by hand): put it back.
                                store
                                    .call(client.put(key.as_str(), value.clone(), Some(PutOptions::new().with_lease(id))))
                                    .await?;
                            } else {
                                known.remove(name);
                            }
                        }
                    }
                }
                publish(members, &known);
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break Ok(()),
        }
    };
    if result.is_ok() {
        // Stopping: leave the cluster now rather than after the TTL.
        lease.revoke(store).await;
    }
    result
}

fn publish(members: &watch::Sender<Members>, known: &BTreeMap<String, Member>) {
    let list: Vec<Member> = known.values().cloned().collect();
    crate::metrics::metrics()
        .peer_members
        .set(i64::try_from(list.len()).unwrap_or(i64::MAX));
    members.send_if_modified(|cur| {
        if **cur == list {
            false
        } else {
            tracing::info!(members = ?list.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), "peer members changed");
            *cur = Arc::new(list);
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_list_parses_and_includes_this_node_once() {
        let me = parse_member("node-a=10.0.0.1:5051").expect("me");
        let m = static_members(
            &me,
            &[
                "node-b=10.0.0.2:5051".into(),
                "node-a=10.0.0.1:5051".into(),
                "node-c=[fd00::3]:5051".into(),
            ],
        )
        .expect("members");
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["node-a", "node-b", "node-c"]);
    }

    #[test]
    fn bad_entries_are_named() {
        let me = parse_member("a=h:1").expect("me");
        for bad in [
            "node-b",
            "node-b=10.0.0.2",
            "node-b=10.0.0.2:0",
            "node-b=10.0.0.2:99999",
            "=10.0.0.2:5051",
            "a/b=10.0.0.2:5051",
            "b=http://x:1",
        ] {
            let e = static_members(&me, &[bad.into()]).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert_eq!(
            static_members(&me, &["b=h:1".into(), "b=h:2".into()]),
            Err(DiscoveryError::Duplicate("b".into()))
        );
    }

    #[test]
    fn etcd_values_must_match_their_key() {
        let p = "/imagestream/peers/";
        let v = br#"{"name":"n1","addr":"10.0.0.1:5051"}"#;
        assert!(decode(b"/imagestream/peers/n1", v, p).is_some());
        assert!(decode(b"/imagestream/peers/n2", v, p).is_none());
        assert!(decode(b"/imagestream/peers/n1", b"garbage", p).is_none());
        let huge = format!(r#"{{"name":"n1","addr":"{}:1"}}"#, "a".repeat(600));
        assert!(decode(b"/imagestream/peers/n1", huge.as_bytes(), p).is_none());
    }
}
