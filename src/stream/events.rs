//! Tag change events: every change of a stream tag's current image (set, import, rollback,
//! follow, delete) becomes a [`TagEvent`], derived in one place — the view, by comparing a
//! stream before and after each change — and broadcast to watchers (the admin `Watch` call, the
//! cache's prefetch, triggers). A watcher that falls too far behind is told how many events it
//! missed, and must re-list.

use super::model::Stream;
use serde::Serialize;
use std::collections::BTreeSet;

/// Events kept for slow watchers before they are told they missed some.
pub const EVENT_BUFFER: usize = 1024;

/// One change of a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagEvent {
    /// Increases by one per event in this process.
    pub sequence: u64,
    pub namespace: String,
    pub stream: String,
    pub tag: String,
    /// The digest before the change (`None` for a new tag).
    pub old_digest: Option<String>,
    /// The digest after the change (`None` when the tag or stream was deleted).
    pub new_digest: Option<String>,
    /// The tag's current generation after the change (0 when deleted).
    pub generation: u64,
    /// `set`, `import`, `rollback to generation N`, `follows NS/NAME:TAG`, or `delete`.
    pub cause: String,
    /// RFC 3339, UTC.
    pub time: String,
    /// The new generation's signature check (`verified (KEY)`, `unverified: WHY`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The events that turn `old` into `new` (the same stream, or its creation or deletion).
/// `sequence` and `time` are left for the publisher to fill.
pub fn diff(old: Option<&Stream>, new: Option<&Stream>) -> Vec<TagEvent> {
    let Some(any) = new.or(old) else {
        return Vec::new();
    };
    let names: BTreeSet<&String> = old
        .iter()
        .chain(new.iter())
        .flat_map(|s| s.tags.keys())
        .collect();
    let mut out = Vec::new();
    for name in names {
        let before = old.and_then(|s| s.tags.get(name)).and_then(|t| t.current());
        let after = new.and_then(|s| s.tags.get(name)).and_then(|t| t.current());
        let event = |cause: String, generation: u64| TagEvent {
            sequence: 0,
            namespace: any.namespace.clone(),
            stream: any.name.clone(),
            tag: name.clone(),
            old_digest: before.map(|g| g.digest.clone()),
            new_digest: after.map(|g| g.digest.clone()),
            generation,
            cause,
            time: String::new(),
            signature: after
                .and_then(|g| g.verification.as_ref())
                .map(|v| v.summary()),
        };
        match (before, after) {
            (_, Some(a)) if before.map(|b| b.generation) != Some(a.generation) => {
                out.push(event(a.cause.clone(), a.generation));
            }
            (Some(_), None) => out.push(event("delete".into(), 0)),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::model::{NewGeneration, Tag};

    fn stream_with(tags: &[(&str, &[&str])]) -> Stream {
        let mut s = Stream::new(
            &crate::stream::model::StreamKey::new("team-a", "app"),
            false,
        );
        for (name, digests) in tags {
            let mut t = Tag {
                schedule: None,
                condition: None,
                name: name.to_string(),
                source: "r/app:v1".into(),
                generations: Vec::new(),
            };
            for d in *digests {
                t.push(
                    NewGeneration {
                        digest: d.to_string(),
                        reference: format!("r/app@{d}"),
                        created: String::new(),
                        cause: "set".into(),
                        source: "r/app:v1".into(),
                        verification: None,
                    },
                    10,
                );
            }
            s.tags.insert(name.to_string(), t);
        }
        s
    }

    #[test]
    fn set_move_and_delete_are_events() {
        let a = stream_with(&[("prod", &["sha256:1"])]);
        let b = stream_with(&[("prod", &["sha256:1", "sha256:2"]), ("dev", &["sha256:3"])]);
        let e = diff(Some(&a), Some(&b));
        assert_eq!(e.len(), 2);
        let prod = e.iter().find(|e| e.tag == "prod").expect("prod");
        assert_eq!(prod.old_digest.as_deref(), Some("sha256:1"));
        assert_eq!(prod.new_digest.as_deref(), Some("sha256:2"));
        assert_eq!(prod.generation, 2);
        let dev = e.iter().find(|e| e.tag == "dev").expect("dev");
        assert_eq!(dev.old_digest, None);
        assert!(diff(Some(&b), Some(&b)).is_empty());
        let gone = diff(Some(&b), None);
        assert_eq!(gone.len(), 2);
        assert!(gone
            .iter()
            .all(|e| e.cause == "delete" && e.new_digest.is_none()));
    }
}
