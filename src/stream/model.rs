//! The stream data model: a stream (`namespace/name`) holds tags; a tag holds its source and a
//! bounded, append-only history of generations, newest first. These are the records the stores
//! persist (as JSON) and the admin API shows.

use crate::signature::policy::{SignaturePolicy, Verification};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default number of generations kept per tag.
pub const DEFAULT_HISTORY_LIMIT: usize = 20;

/// Key of a stream: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamKey {
    pub namespace: String,
    pub name: String,
}

impl StreamKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    pub namespace: String,
    pub name: String,
    /// Short names (`name:tag`) resolve to this stream for pods of its namespace.
    pub lookup_local: bool,
    pub tags: BTreeMap<String, Tag>,
    /// Which namespaces' pods may use the stream.
    #[serde(default)]
    pub access: Access,
    /// Incremented by every write; stores use it for compare-and-swap.
    #[serde(default)]
    pub revision: u64,
    /// The stream's signature policy; `None` follows the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SignaturePolicy>,
}

/// A stream's access list: namespace names or globs (`team-*`). The stream's own namespace is
/// allowed unless denied; a deny wins over an allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// Checks an access pattern: a namespace name with `*`, `?` or `[...]` globs.
pub fn validate_access_pattern(pattern: &str) -> Result<(), String> {
    let ok_chars = pattern.chars().all(|c| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(c, '-' | '*' | '?' | '[' | ']' | '!')
    });
    if pattern.is_empty() || pattern.len() > super::names::MAX_NAMESPACE_LEN || !ok_chars {
        return Err(format!(
            "invalid access pattern {pattern:?}: a namespace name or glob (lowercase letters, digits, '-', '*', '?', [...]) of at most 63 characters"
        ));
    }
    glob::Pattern::new(pattern)
        .map(|_| ())
        .map_err(|e| format!("invalid access pattern {pattern:?}: {e}"))
}

fn matches(pattern: &str, namespace: &str) -> bool {
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches(namespace))
}

impl Stream {
    pub fn new(key: &StreamKey, lookup_local: bool) -> Self {
        Self {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            lookup_local,
            tags: BTreeMap::new(),
            access: Access::default(),
            revision: 0,
            policy: None,
        }
    }

    pub fn key(&self) -> StreamKey {
        StreamKey::new(&self.namespace, &self.name)
    }

    /// Whether pods of `namespace` may use this stream.
    pub fn allows(&self, namespace: &str) -> bool {
        if self.access.deny.iter().any(|p| matches(p, namespace)) {
            return false;
        }
        namespace == self.namespace || self.access.allow.iter().any(|p| matches(p, namespace))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub name: String,
    /// What the tag follows: an image reference, by tag or by digest.
    pub source: String,
    /// Newest first; never empty for a stored tag.
    pub generations: Vec<Generation>,
    /// Re-resolve the source on a schedule (`tag set --scheduled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// The outcome of the last scheduled check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<ImportCondition>,
}

/// How often a scheduled tag's source is re-resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub interval_secs: u64,
}

/// The last scheduled check of a tag's source. A failure never moves the tag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportCondition {
    /// RFC 3339, UTC.
    pub last_check: String,
    /// RFC 3339, UTC; empty if no check has succeeded yet.
    pub last_success: String,
    /// Empty when the last check succeeded.
    pub error: String,
    pub consecutive_failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub generation: u64,
    /// `sha256:<hex>` of the manifest (or index).
    pub digest: String,
    /// `registry/repository@sha256:<hex>`.
    pub reference: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// `set`, `rollback to generation N`, `import`.
    pub cause: String,
    /// The source reference this digest was pinned from.
    #[serde(default)]
    pub source: String,
    /// The check of its signature, when a policy applied (or `tag verify` ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

impl Tag {
    /// The generation the tag points at now.
    pub fn current(&self) -> Option<&Generation> {
        self.generations.first()
    }

    /// Appends a generation (newest first) and trims the history to `limit` entries.
    /// Generation numbers grow monotonically.
    pub fn push(&mut self, new: NewGeneration, limit: usize) -> &Generation {
        let generation = self.current().map_or(1, |g| g.generation + 1);
        self.generations.insert(
            0,
            Generation {
                generation,
                digest: new.digest,
                reference: new.reference,
                created: new.created,
                cause: new.cause,
                source: new.source,
                verification: new.verification,
            },
        );
        self.generations.truncate(limit.max(1));
        &self.generations[0]
    }

    /// The generation a rollback goes to: `to` if given, else the newest earlier generation
    /// whose digest differs from the current one.
    pub fn rollback_target(&self, to: Option<u64>) -> Result<&Generation, RollbackError> {
        let current = self.current().ok_or(RollbackError::NoHistory)?;
        match to {
            Some(n) => {
                let target = self
                    .generations
                    .iter()
                    .find(|g| g.generation == n)
                    .ok_or_else(|| RollbackError::NoSuchGeneration {
                        generation: n,
                        oldest: self.generations.last().map_or(0, |g| g.generation),
                        newest: current.generation,
                    })?;
                if target.generation == current.generation {
                    return Err(RollbackError::AlreadyCurrent(n));
                }
                Ok(target)
            }
            None => self
                .generations
                .iter()
                .find(|g| g.digest != current.digest)
                .ok_or(RollbackError::NoEarlierDigest),
        }
    }
}

/// What a new generation records; its number is assigned by [`Tag::push`].
#[derive(Debug, Clone)]
pub struct NewGeneration {
    pub digest: String,
    pub reference: String,
    pub created: String,
    pub cause: String,
    pub source: String,
    pub verification: Option<Verification>,
}

/// Why a rollback cannot happen.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RollbackError {
    #[error("the tag has no history")]
    NoHistory,
    #[error(
        "generation {generation} is not in the kept history (generations {oldest} to {newest})"
    )]
    NoSuchGeneration {
        generation: u64,
        oldest: u64,
        newest: u64,
    },
    #[error("generation {0} is the current generation")]
    AlreadyCurrent(u64),
    #[error("no earlier generation has a different digest")]
    NoEarlierDigest,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(digest: &str) -> NewGeneration {
        NewGeneration {
            digest: digest.into(),
            reference: "r".into(),
            created: "now".into(),
            cause: "set".into(),
            source: "r/app:v1".into(),
            verification: None,
        }
    }

    fn tag() -> Tag {
        Tag {
            schedule: None,
            condition: None,
            name: "prod".into(),
            source: "r/app:v1".into(),
            generations: vec![],
        }
    }

    #[test]
    fn history_is_bounded_and_monotonic() {
        let mut t = tag();
        for i in 0..5 {
            t.push(gen(&format!("sha256:{i}")), 3);
        }
        assert_eq!(t.generations.len(), 3);
        assert_eq!(t.current().map(|g| g.generation), Some(5));
        assert_eq!(t.generations[2].generation, 3);
    }

    #[test]
    fn access_lists() {
        let mut s = Stream::new(&StreamKey::new("team-a", "app"), false);
        assert!(s.allows("team-a"));
        assert!(!s.allows("team-b"));
        s.access.allow.push("team-*".into());
        assert!(s.allows("team-b"));
        assert!(!s.allows("other"));
        s.access.deny.push("team-b".into());
        assert!(!s.allows("team-b"));
        assert!(s.allows("team-c"));
        s.access.deny.push("team-a".into());
        assert!(!s.allows("team-a"));
        assert!(validate_access_pattern("team-*").is_ok());
        assert!(validate_access_pattern("../x").is_err());
        assert!(validate_access_pattern("").is_err());
        assert!(validate_access_pattern(&"a".repeat(64)).is_err());
    }

    #[test]
    fn rollback_targets() {
        let mut t = tag();
        t.push(gen("sha256:a"), 20);
        assert_eq!(t.rollback_target(None), Err(RollbackError::NoEarlierDigest));
        t.push(gen("sha256:b"), 20);
        t.push(gen("sha256:b"), 20);
        assert_eq!(t.rollback_target(None).map(|g| g.generation), Ok(1));
        assert_eq!(t.rollback_target(Some(2)).map(|g| g.generation), Ok(2));
        assert_eq!(
            t.rollback_target(Some(3)),
            Err(RollbackError::AlreadyCurrent(3))
        );
        assert!(matches!(
            t.rollback_target(Some(9)),
            Err(RollbackError::NoSuchGeneration { .. })
        ));
    }
}
