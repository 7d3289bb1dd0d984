//! The process's Prometheus metrics, all under the `imagestream_` prefix: what the node refused
//! (and, in dry-run mode, would have refused), CRI calls by method and gRPC status, and the
//! layer cache and registry mirror.
//!
//! Served in the Prometheus text format at `GET /metrics` on the mirror port, and printed by
//! `imagestream metrics` (admin API `Metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// `access` (stream access list), `registry` (allowed_registries), `unpinned` (require_pinned).
    pub reason: String,
    /// `false` in dry-run mode: logged and counted, not refused.
    pub enforced: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminLabels {
    pub action: String,
}

/// Labels of `imagestream_cri_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CriCallLabels {
    /// The CRI method (`ImageStatus`), or `other` for any path not in the CRI v1 method list.
    pub method: &'static str,
    /// The gRPC status code name (`OK`, `NotFound`, `Unavailable`, ...).
    pub code: &'static str,
}

/// Labels of `imagestream_cri_call_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CriMethodLabels {
    pub method: &'static str,
}

/// Labels of `imagestream_cache_bytes_served_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `cache` (served from the local layer cache) or `upstream` (fetched from the registry).
    pub source: String,
}

/// Labels of `imagestream_trigger_runs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// The trigger's name in the config.
    pub trigger: String,
    /// `ok`, `retry` (an attempt failed, another follows) or `failed` (gave up).
    pub outcome: String,
}

/// Labels of `imagestream_mirror_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// `manifest`, `blob` or `other`.
    pub kind: String,
    /// The HTTP status of the answer, as a number (`200`, `404`).
    pub code: String,
}

/// Labels of `imagestream_peer_fetches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerFetchLabels {
    /// The peer's node name.
    pub peer: String,
    /// `ok`, `not_found`, `unreachable`, `slow` (no first byte in time), `cut` (body ended
    /// early or stalled), `mismatch` (wrong bytes: refused), `refused` (TLS or HTTP error).
    pub outcome: &'static str,
}

/// Labels of `imagestream_signature_verifications_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignatureLabels {
    /// The policy's mode: `enforce` or `warn`.
    pub mode: &'static str,
    /// `verified`, `unsigned`, `untrusted` (no trusted key matched), `digest_differs`,
    /// `invalid` (bad payload, signature or manifest), `unavailable` (could not be fetched).
    pub outcome: &'static str,
}

/// Labels of `imagestream_signature_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignatureRefusalLabels {
    /// Where: `set`, `import`, `scheduled-import`, `follow`, `rollback`, `PullImage`,
    /// `CreateContainer`.
    pub at: &'static str,
}

/// Labels of `imagestream_peer_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerServedLabels {
    /// The HTTP status of the answer to a peer, as a number.
    pub code: String,
}

/// gRPC status code names by code number (`tonic::Code as usize`), as in the gRPC spec.
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The gRPC name of `code` (`OK`, `NotFound`).
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    GRPC_CODE_NAMES
        .get(code as usize)
        .copied()
        .unwrap_or("Unknown")
}

/// Upper bounds of the CRI call duration buckets: 50 µs doubling to about 52 s (21 buckets).
fn cri_duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 21)
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub pull_denials: Family<DenialLabels, Counter>,
    pub admin_denials: Family<AdminLabels, Counter>,
    /// `imagestream_cri_calls_total{method,code}`; record with [`Metrics::cri_call`].
    pub cri_calls: Family<CriCallLabels, Counter>,
    /// `imagestream_cri_call_duration_seconds{method}`; record with [`Metrics::cri_call`].
    pub cri_call_duration: HistogramFamily<CriMethodLabels>,
    /// `imagestream_cache_hits_total`.
    pub cache_hits: Counter,
    /// `imagestream_cache_misses_total`.
    pub cache_misses: Counter,
    /// `imagestream_cache_bytes_served_total{source="cache"|"upstream"}`; see also
    /// [`Metrics::bytes_served`].
    pub cache_bytes_served: Family<SourceLabels, Counter>,
    served_from_cache: Counter,
    served_from_upstream: Counter,
    /// `imagestream_upstream_fetches_total`.
    pub upstream_fetches: Counter,
    /// `imagestream_digest_mismatches_total`.
    pub digest_mismatches: Counter,
    /// `imagestream_cache_evictions_total`.
    pub cache_evictions: Counter,
    /// `imagestream_cache_size_bytes`.
    pub cache_size_bytes: Gauge,
    /// `imagestream_mirror_requests_total{kind,code}`; see also [`Metrics::mirror_request`].
    pub mirror_requests: Family<MirrorLabels, Counter>,
    /// `imagestream_trigger_runs_total{trigger,outcome}`.
    pub trigger_runs: Family<TriggerLabels, Counter>,
    /// `imagestream_store_view_stale_seconds`: seconds since the view was last known equal
    /// to the cluster store (0 with the embedded store).
    pub store_view_stale_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `imagestream_store_connected`: 1 while the cluster store answers.
    pub store_connected: Gauge,
    /// `imagestream_store_revision`: the cluster store revision the view has reached.
    pub store_revision: Gauge,
    /// `imagestream_importer_leader`: 1 on the node that runs scheduled imports.
    pub importer_leader: Gauge,
    /// `imagestream_peer_fetches_total{peer,outcome}`: blobs asked of peers.
    pub peer_fetches: Family<PeerFetchLabels, Counter>,
    /// `imagestream_peer_requests_total{code}`: blob requests peers made of this node.
    pub peer_requests: Family<PeerServedLabels, Counter>,
    /// `imagestream_peer_members`: live members of the cluster as this node sees them.
    pub peer_members: Gauge,
    /// `imagestream_peer_discovery_errors_total`.
    pub peer_discovery_errors: Counter,
    /// `imagestream_signature_verifications_total{mode,outcome}`.
    pub signature_verifications: Family<SignatureLabels, Counter>,
    /// `imagestream_signature_refusals_total{at}`: digests not pinned, and pods not started,
    /// under an `enforce` policy.
    pub signature_refusals: Family<SignatureRefusalLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("imagestream");
        let pull_denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "pull_denials",
            "Image uses refused (or, enforced=false, that dry-run mode would refuse) in PullImage and CreateContainer",
            pull_denials.clone(),
        );
        let admin_denials = Family::<AdminLabels, Counter>::default();
        registry.register(
            "admin_denials",
            "Admin API calls refused for the caller's credentials",
            admin_denials.clone(),
        );

        let cri_calls = Family::<CriCallLabels, Counter>::default();
        registry.register(
            "cri_calls",
            "CRI calls answered on the CRI socket, by method and gRPC status code",
            cri_calls.clone(),
        );
        let cri_call_duration = HistogramFamily::<CriMethodLabels>::new_with_constructor(|| {
            Histogram::new(cri_duration_buckets())
        });
        registry.register(
            "cri_call_duration_seconds",
            "Time from a CRI call's arrival to the end of its answer (the gRPC status), by method",
            cri_call_duration.clone(),
        );

        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let cache_hits = counter(
            &mut registry,
            "cache_hits",
            "Blob requests answered from the local layer cache",
        );
        let cache_misses = counter(
            &mut registry,
            "cache_misses",
            "Blob requests not in the local layer cache",
        );
        let cache_bytes_served = Family::<SourceLabels, Counter>::default();
        registry.register(
            "cache_bytes_served",
            "Bytes of blobs served by the mirror, by where they came from (cache or upstream)",
            cache_bytes_served.clone(),
        );
        let served_from_cache = cache_bytes_served.get_or_create_owned(&SourceLabels {
            source: "cache".into(),
        });
        let served_from_upstream = cache_bytes_served.get_or_create_owned(&SourceLabels {
            source: "upstream".into(),
        });
        let upstream_fetches = counter(
            &mut registry,
            "upstream_fetches",
            "Fetches from upstream registries",
        );
        let digest_mismatches = counter(
            &mut registry,
            "digest_mismatches",
            "Upstream content whose digest did not match the one requested (refused)",
        );
        let cache_evictions = counter(
            &mut registry,
            "cache_evictions",
            "Blobs evicted from the local layer cache",
        );
        let cache_size_bytes = Gauge::default();
        registry.register(
            "cache_size_bytes",
            "Bytes currently held in the local layer cache",
            cache_size_bytes.clone(),
        );
        let mirror_requests = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "mirror_requests",
            "Registry mirror requests, by kind (manifest, blob, other) and HTTP status",
            mirror_requests.clone(),
        );
        let trigger_runs = Family::<TriggerLabels, Counter>::default();
        registry.register(
            "trigger_runs",
            "Trigger attempts on tag events, by trigger and outcome (ok, retry, failed)",
            trigger_runs.clone(),
        );
        let store_view_stale_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "store_view_stale_seconds",
            "Seconds since this node's stream view was last known equal to the cluster store (etcd); 0 with the embedded store",
            store_view_stale_seconds.clone(),
        );
        let store_connected = Gauge::default();
        registry.register(
            "store_connected",
            "1 while the stream store answers (always with the embedded store)",
            store_connected.clone(),
        );
        let store_revision = Gauge::default();
        registry.register(
            "store_revision",
            "The cluster store (etcd) revision this node's view has caught up with",
            store_revision.clone(),
        );
        let importer_leader = Gauge::default();
        registry.register(
            "importer_leader",
            "1 on the node that runs scheduled imports (the elected one, with etcd)",
            importer_leader.clone(),
        );
        let peer_fetches = Family::<PeerFetchLabels, Counter>::default();
        registry.register(
            "peer_fetches",
            "Blobs asked of peers on a cache miss, by peer and outcome (ok, not_found, unreachable, slow, cut, mismatch, refused)",
            peer_fetches.clone(),
        );
        let peer_requests = Family::<PeerServedLabels, Counter>::default();
        registry.register(
            "peer_requests",
            "Blob requests from peers on the peer endpoint, by HTTP status",
            peer_requests.clone(),
        );
        let peer_members = Gauge::default();
        registry.register(
            "peer_members",
            "Live members of the cluster (this node included) as peer discovery sees them",
            peer_members.clone(),
        );
        let peer_discovery_errors = counter(
            &mut registry,
            "peer_discovery_errors",
            "Peer discovery sessions with etcd that failed (retried)",
        );
        let signature_verifications = Family::<SignatureLabels, Counter>::default();
        registry.register(
            "signature_verifications",
            "Signature checks of digests entering a stream (or re-verified), by policy mode and outcome (verified, unsigned, untrusted, digest_differs, invalid, unavailable)",
            signature_verifications.clone(),
        );
        let signature_refusals = Family::<SignatureRefusalLabels, Counter>::default();
        registry.register(
            "signature_refusals",
            "Digests not pinned and stream references not run because of an enforce signature policy, by where (set, import, scheduled-import, follow, rollback, PullImage, CreateContainer)",
            signature_refusals.clone(),
        );
        Self {
            signature_verifications,
            signature_refusals,
            peer_fetches,
            peer_requests,
            peer_members,
            peer_discovery_errors,
            store_view_stale_seconds,
            store_connected,
            store_revision,
            importer_leader,
            registry,
            pull_denials,
            admin_denials,
            cri_calls,
            cri_call_duration,
            cache_hits,
            cache_misses,
            cache_bytes_served,
            served_from_cache,
            served_from_upstream,
            upstream_fetches,
            digest_mismatches,
            cache_evictions,
            cache_size_bytes,
            mirror_requests,
            trigger_runs,
        }
    }

    /// Counts a refused (or, in dry run, would-be refused) image use.
    pub fn pull_denied(&self, reason: &str, enforced: bool) {
        self.pull_denials
            .get_or_create(&DenialLabels {
                reason: reason.to_string(),
                enforced: enforced.to_string(),
            })
            .inc();
    }

    /// Records one finished CRI call: `method` is its label (a CRI method name, or `other`),
    /// `code` its gRPC status, `elapsed` its duration.
    pub fn cri_call(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        // `tonic::Code` is 0..=16, the index of its name.
        let code = GRPC_CODE_NAMES[(code as usize).min(GRPC_CODE_NAMES.len() - 1)];
        self.cri_calls
            .get_or_create(&CriCallLabels { method, code })
            .inc();
        self.cri_call_duration
            .get_or_create(&CriMethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts `bytes` of blob served by the mirror, from `source` (`cache` or `upstream`).
    pub fn bytes_served(&self, source: &str, bytes: u64) {
        match source {
            "cache" => self.served_from_cache.inc_by(bytes),
            "upstream" => self.served_from_upstream.inc_by(bytes),
            other => self
                .cache_bytes_served
                .get_or_create(&SourceLabels {
                    source: other.to_string(),
                })
                .inc_by(bytes),
        };
    }

    /// Counts one signature check under a policy of `mode` with its `outcome`.
    pub fn signature_verified(&self, mode: &'static str, outcome: &'static str) {
        self.signature_verifications
            .get_or_create(&SignatureLabels { mode, outcome })
            .inc();
    }

    /// Counts one refusal of an `enforce` policy `at` an operation or CRI call.
    pub fn signature_refused(&self, at: &'static str) {
        self.signature_refusals
            .get_or_create(&SignatureRefusalLabels { at })
            .inc();
    }

    /// Counts one blob asked of `peer` with its `outcome` (see [`PeerFetchLabels`]).
    pub fn peer_fetch(&self, peer: &str, outcome: &'static str) {
        self.peer_fetches
            .get_or_create(&PeerFetchLabels {
                peer: peer.to_string(),
                outcome,
            })
            .inc();
    }

    /// Counts one mirror request of `kind` (`manifest`, `blob`, `other`) answered with HTTP
    /// `status`.
    pub fn mirror_request(&self, kind: &str, status: u16) {
        self.mirror_requests
            .get_or_create(&MirrorLabels {
                kind: kind.to_string(),
                code: status.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_code_names() {
        assert_eq!(grpc_code_name(tonic::Code::Ok), "OK");
        assert_eq!(grpc_code_name(tonic::Code::NotFound), "NotFound");
        assert_eq!(grpc_code_name(tonic::Code::Unavailable), "Unavailable");
        assert_eq!(
            grpc_code_name(tonic::Code::Unauthenticated),
            "Unauthenticated"
        );
        for (i, name) in GRPC_CODE_NAMES.iter().enumerate() {
            let code = tonic::Code::from_i32(i as i32);
            assert_eq!(code as usize, i);
            // tonic's names are ours, but for `Ok`.
            if code != tonic::Code::Ok {
                assert_eq!(format!("{code:?}"), *name);
            }
        }
    }

    #[test]
    fn cri_calls_are_labelled_by_method_and_code() {
        let m = Metrics::new();
        let (status, other) = ("ImageStatus", "other");
        m.cri_call(status, tonic::Code::Ok, Duration::from_micros(120));
        m.cri_call(status, tonic::Code::Ok, Duration::from_micros(80));
        m.cri_call(status, tonic::Code::NotFound, Duration::from_millis(3));
        m.cri_call(other, tonic::Code::Unimplemented, Duration::from_secs(100));
        m.cri_call(other, tonic::Code::Unimplemented, Duration::ZERO);
        let text = m.encode();
        for line in [
            r#"imagestream_cri_calls_total{method="ImageStatus",code="OK"} 2"#,
            r#"imagestream_cri_calls_total{method="ImageStatus",code="NotFound"} 1"#,
            r#"imagestream_cri_calls_total{method="other",code="Unimplemented"} 2"#,
            r#"imagestream_cri_call_duration_seconds_count{method="ImageStatus"} 3"#,
            r#"imagestream_cri_call_duration_seconds_bucket{le="0.0001",method="ImageStatus"} 1"#,
            r#"imagestream_cri_call_duration_seconds_bucket{le="+Inf",method="other"} 2"#,
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        let buckets: Vec<f64> = cri_duration_buckets().collect();
        assert_eq!(buckets[0], 50e-6);
        assert!((50.0..=70.0).contains(buckets.last().unwrap()));
    }

    #[test]
    fn cache_and_mirror_metrics_are_exposed() {
        let m = Metrics::new();
        m.cache_hits.inc();
        m.cache_misses.inc_by(2);
        m.bytes_served("cache", 100);
        m.bytes_served("upstream", 7);
        m.upstream_fetches.inc();
        m.digest_mismatches.inc();
        m.cache_evictions.inc();
        m.cache_size_bytes.set(4096);
        m.mirror_request("blob", 200);
        m.mirror_requests
            .get_or_create(&MirrorLabels {
                kind: "manifest".into(),
                code: "404".into(),
            })
            .inc();
        let text = m.encode();
        for line in [
            "imagestream_cache_hits_total 1",
            "imagestream_cache_misses_total 2",
            r#"imagestream_cache_bytes_served_total{source="cache"} 100"#,
            r#"imagestream_cache_bytes_served_total{source="upstream"} 7"#,
            "imagestream_upstream_fetches_total 1",
            "imagestream_digest_mismatches_total 1",
            "imagestream_cache_evictions_total 1",
            "imagestream_cache_size_bytes 4096",
            r#"imagestream_mirror_requests_total{kind="blob",code="200"} 1"#,
            r#"imagestream_mirror_requests_total{kind="manifest",code="404"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
