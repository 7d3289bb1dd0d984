//! The node's pull policy, checked in PullImage and CreateContainer for the reference the
//! runtime will pull: `allowed_registries` (registry hosts, globs) and `require_pinned` (plain
//! references must carry a digest). Each switch is off by default; in dry-run mode a refusal is
//! logged and counted instead of enforced.

use crate::audit;
use crate::metrics::metrics;
use crate::registry::RegistryClient;
use tonic::{Code, Status};

#[derive(Debug, Clone, Default)]
pub struct PullPolicy {
    allowed_registries: Vec<glob::Pattern>,
    require_pinned: bool,
    dry_run: bool,
}

impl PullPolicy {
    pub fn new(allowed_registries: &[String], require_pinned: bool, dry_run: bool) -> Self {
        Self {
            allowed_registries: allowed_registries
                .iter()
                .filter_map(|p| glob::Pattern::new(p).ok())
                .collect(),
            require_pinned,
            dry_run,
        }
    }

    /// Checks that the runtime may pull `reference`. `pinned_by_stream` says it came from a
    /// stream tag (pinned by construction). References that do not parse are left to the runtime.
    pub fn check(
        &self,
        reference: &str,
        pinned_by_stream: bool,
        pod_namespace: Option<&str>,
    ) -> Result<(), Status> {
        if self.allowed_registries.is_empty() && !self.require_pinned {
            return Ok(());
        }
        let Ok(parsed) = RegistryClient::parse(reference) else {
            return Ok(());
        };
        let refusal = if !self.allowed_registries.is_empty()
            && !self
                .allowed_registries
                .iter()
                .any(|p| p.matches(parsed.registry()))
        {
            Some((
                "registry",
                format!(
                    "registry {} of image {reference:?} is not allowed on this node (allowed_registries: {})",
                    parsed.registry(),
                    self.allowed_registries.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ))
        } else if self.require_pinned && !pinned_by_stream && parsed.digest().is_none() {
            Some((
                "unpinned",
                format!(
                    "image {reference:?} is not pinned and this node requires pinned images (require_pinned): refer to it by digest ({}/{}@sha256:…) or through an image stream tag",
                    parsed.registry(),
                    parsed.repository()
                ),
            ))
        } else {
            None
        };
        let Some((reason, message)) = refusal else {
            return Ok(());
        };
        metrics().pull_denied(reason, !self.dry_run);
        tracing::warn!(
            target: "imagestream::audit",
            action = "pull",
            reason,
            reference,
            pod_namespace = pod_namespace.unwrap_or(""),
            enforced = !self.dry_run,
            "{}",
            if self.dry_run { "pull would be denied (policy dry run)" } else { "pull denied by node policy" }
        );
        if self.dry_run {
            Ok(())
        } else {
            Err(audit::status(Code::PermissionDenied, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_and_pinning() {
        let p = PullPolicy::new(&["127.0.0.1:*".into(), "*.example.com".into()], true, false);
        let d = format!("@sha256:{}", "a".repeat(64));
        assert!(p
            .check(&format!("127.0.0.1:5000/app{d}"), false, None)
            .is_ok());
        assert!(p
            .check(&format!("r.example.com/app{d}"), false, None)
            .is_ok());
        let e = p
            .check(&format!("docker.io/library/nginx{d}"), false, None)
            .expect_err("registry");
        assert!(e.message().contains("docker.io"));
        let e = p
            .check("127.0.0.1:5000/app:v1", false, None)
            .expect_err("unpinned");
        assert!(e.message().contains("require_pinned"));
        assert!(p.check("127.0.0.1:5000/app:v1", true, None).is_ok());
        let dry = PullPolicy::new(&["x".into()], true, true);
        assert!(dry.check("nginx:latest", false, None).is_ok());
        assert!(PullPolicy::default().check("nginx", false, None).is_ok());
    }
}
