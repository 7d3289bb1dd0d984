//! Peers: the node caches of a cluster as one cache. On a cache miss a node asks other nodes
//! for the blob before the registry; whatever a peer sends is hashed as it arrives and stored
//! only if it matches its digest, exactly like a registry fill.
//!
//! # Layout
//!
//! - [`discovery`]: who the peers are. With the etcd store each node registers
//!   `<prefix>peers/<node>` under a lease and watches the prefix; with the embedded store the
//!   `peers` list of the config is the cluster. Either way the result is a [`Members`] list.
//! - Placement ([`rank`], [`plan_for`]): rendezvous hashing. Each blob digest ranks the live nodes by
//!   `sha256(node || digest)`; the first is the blob's **primary home** (it fills from the
//!   registry, once for the cluster), the first [`DEFAULT_REPLICAS`] are its **homes** (they
//!   keep the digests streams point at, [`crate::cache::pins`]). No per-blob key exists
//!   anywhere: placement is computed, so etcd holds one key per node (docs/cluster.md).
//! - [`client`]: fetches a blob from one peer over mutual TLS, with a first-byte deadline.
//! - [`tls`]: the cluster CA, node certificates (`imagestream peer certs`) and the rustls
//!   configs of both ends.
//!
//! The peer endpoint itself (the server) is [`crate::mirror::peer_endpoint`]: it serves the
//! cache, and the cache asks this module, so data flows mirror → cache → peer.

pub mod client;
pub mod discovery;
pub mod tls;

use crate::registry::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Homes per blob: the nodes that keep streams' pinned digests whatever their LRU does, so
/// that the cluster can roll back with the registry gone even when one home is down.
pub const DEFAULT_REPLICAS: usize = 2;
/// How long a peer may take to send the first byte of a blob before the next is asked. A peer
/// on the node network answers in milliseconds; a second covers a loaded node without making
/// a pull wait long behind a dead one (the pull's own timeout is minutes).
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a node waits for the blob's primary home to fill it from the registry (the wait
/// between bytes, once the first arrived): a fill by the primary is shared by every node.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Peers asked for one blob at most (after its homes, the rest of the ranking): a miss on
/// every home means the blob is new, and asking the whole cluster would cost more than the
/// registry.
pub const MAX_PEERS_ASKED: usize = 4;
/// Port of the peer endpoint when `peer_listen` names none.
pub const DEFAULT_PORT: u16 = 5051;
/// Lease TTL of a node's registration in etcd: how long a dead node stays listed. Peers of a
/// dead node are skipped after one failed connection anyway; the TTL only bounds the wasted
/// attempts. Keep-alives go every TTL/3 (docs/cluster.md has the cost).
pub const DEFAULT_LEASE_TTL_SECS: u64 = 10;

/// One node of the cluster, as discovery lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (`node_name`), unique in the cluster.
    pub name: String,
    /// `HOST:PORT` of its peer endpoint.
    pub addr: String,
}

/// The live members, this node included, sorted by name.
pub type Members = Arc<Vec<Member>>;

/// Settings of the peer layer (config keys `peer_*`).
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// This node's name: what other nodes rank it by.
    pub node_name: String,
    pub replicas: usize,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
}

/// What a node does on a miss of one blob ([`Peers::plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillPlan {
    /// This node is the blob's primary home: the registry first, the peers only when it fails.
    pub registry_first: bool,
    /// The peers to ask, in order. The first asked when `!registry_first` is the primary home,
    /// which is asked to fill from the registry itself if it does not hold the blob.
    pub peers: Vec<Member>,
}

/// Rendezvous weight of `node` for `digest`: the first 8 bytes of `sha256(node "\0" digest)`.
pub fn weight(node: &str, digest: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0u8]);
    h.update(digest.as_bytes());
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out[..8]);
    u64::from_be_bytes(b)
}

/// `members` ranked for `digest`, highest weight first (ties, which sha256 makes
/// impossible in practice, by name).
pub fn rank<'a>(members: &'a [Member], digest: &str) -> Vec<&'a Member> {
    let mut ranked: Vec<(u64, &Member)> = members
        .iter()
        .map(|m| (weight(&m.name, digest), m))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    ranked.into_iter().map(|(_, m)| m).collect()
}

/// The peer layer as the cache sees it: the current members and the plan for a blob.
pub struct Peers {
    settings: PeerSettings,
    members: watch::Receiver<Members>,
    client: client::PeerClient,
}

impl Peers {
    pub fn new(
        settings: PeerSettings,
        members: watch::Receiver<Members>,
        client: client::PeerClient,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            members,
            client,
        })
    }

    pub fn settings(&self) -> &PeerSettings {
        &self.settings
    }

    pub fn client(&self) -> &client::PeerClient {
        &self.client
    }

    /// A receiver that wakes when the members change.
    pub fn members_watch(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    /// The live members now (this node included).
    pub fn members(&self) -> Members {
        self.members.borrow().clone()
    }

    /// Whether this node is one of `digest`'s first `replicas` homes.
    pub fn is_home(&self, digest: &Digest) -> bool {
        let members = self.members();
        rank(&members, digest.as_str())
            .iter()
            .take(self.settings.replicas.max(1))
            .any(|m| m.name == self.settings.node_name)
    }

    /// Where to look for `digest` on a miss: the primary home goes to the registry first;
    /// everyone else asks the ranking in order (the primary first), at most
    /// [`MAX_PEERS_ASKED`] peers, then the registry.
    pub fn plan(&self, digest: &Digest) -> FillPlan {
        plan_for(&self.members(), &self.settings.node_name, digest.as_str())
    }
}

/// [`Peers::plan`] over an explicit member list.
pub fn plan_for(members: &[Member], me: &str, digest: &str) -> FillPlan {
    let ranked = rank(members, digest);
    let registry_first = ranked.first().is_none_or(|m| m.name == me);
    let peers = ranked
        .into_iter()
        .filter(|m| m.name != me)
        .take(MAX_PEERS_ASKED)
        .cloned()
        .collect();
    FillPlan {
        registry_first,
        peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                name: format!("node-{i}"),
                addr: format!("10.0.0.{}:5051", i + 1),
            })
            .collect()
    }

    fn digest(i: usize) -> String {
        Digest::of(format!("blob {i}").as_bytes()).to_string()
    }

    #[test]
    fn exactly_one_primary_per_blob_and_the_others_ask_it_first() {
        let m = members(5);
        for i in 0..200 {
            let d = digest(i);
            let plans: Vec<FillPlan> = m.iter().map(|n| plan_for(&m, &n.name, &d)).collect();
            let primaries: Vec<usize> = (0..m.len()).filter(|&k| plans[k].registry_first).collect();
            assert_eq!(primaries.len(), 1, "blob {i}: {plans:?}");
            let p = &m[primaries[0]];
            for (k, plan) in plans.iter().enumerate() {
                assert!(plan.peers.iter().all(|x| x.name != m[k].name));
                assert!(plan.peers.len() <= MAX_PEERS_ASKED);
                if k != primaries[0] {
                    assert_eq!(plan.peers[0], *p, "node {k} asks the primary first");
                }
            }
        }
    }

    #[test]
    fn placement_spreads_and_moves_little_when_a_node_joins() {
        let m = members(10);
        let mut per_node = std::collections::HashMap::<String, usize>::new();
        let n = 5000;
        for i in 0..n {
            *per_node
                .entry(rank(&m, &digest(i))[0].name.clone())
                .or_default() += 1;
        }
        // Each node is primary for about a tenth of the blobs.
        for (node, count) in &per_node {
            assert!((350..650).contains(count), "{node}: {count} of {n}");
        }
        // An 11th node takes about 1/11 of the blobs; no other blob changes its primary.
        let mut bigger = m.clone();
        bigger.push(Member {
            name: "node-new".into(),
            addr: "10.0.0.99:5051".into(),
        });
        let mut moved = 0;
        for i in 0..n {
            let d = digest(i);
            let before = rank(&m, &d)[0].name.clone();
            let after = rank(&bigger, &d)[0].name.clone();
            if before != after {
                assert_eq!(after, "node-new");
                moved += 1;
            }
        }
        assert!((300..650).contains(&moved), "moved {moved} of {n}");
    }

    #[test]
    fn alone_a_node_goes_to_the_registry() {
        let m = members(1);
        let plan = plan_for(&m, "node-0", &digest(1));
        assert!(plan.registry_first);
        assert!(plan.peers.is_empty());
        let plan = plan_for(&[], "node-0", &digest(1));
        assert!(plan.registry_first);
    }
}
