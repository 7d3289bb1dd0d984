//! Counters of what the node refused (and, in dry-run mode, would have refused), in the
//! Prometheus text format. Read with `imagestream metrics` (admin API `Metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

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

pub struct Metrics {
    registry: Registry,
    pub pull_denials: Family<DenialLabels, Counter>,
    pub admin_denials: Family<AdminLabels, Counter>,
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
        Self {
            registry,
            pull_denials,
            admin_denials,
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
