//! Shared by the fuzz targets: a small stream snapshot to resolve against, and the properties
//! every accepted name must have.
#![allow(dead_code)]

use imagestream::stream::model::{NewGeneration, Stream, StreamKey, Tag};
use imagestream::stream::reference::TagRef;
use imagestream::stream::resolve::{Pinned, Snapshot};

pub const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// `team-a/app` (lookup_local, tags prod and v1.2_3-rc, allows `team-*`, denies `team-x`),
/// `team-b/nginx` (lookup_local, a name like a public image) and `ops/tool.x` (tag latest).
pub fn snapshot() -> Snapshot {
    let stream = |ns: &str, name: &str, local: bool, tags: &[&str]| {
        let mut s = Stream::new(&StreamKey::new(ns, name), local);
        for t in tags {
            let mut tag = Tag {
                name: t.to_string(),
                source: format!("registry.example.com/{name}:{t}"),
                generations: Vec::new(),
                schedule: None,
                condition: None,
            };
            tag.push(
                NewGeneration {
                    digest: DIGEST.into(),
                    reference: format!("registry.example.com/{name}@{DIGEST}"),
                    created: "2026-01-01T00:00:00Z".into(),
                    cause: "set".into(),
                    source: tag.source.clone(),
                    verification: None,
                },
                20,
            );
            s.tags.insert(t.to_string(), tag);
        }
        s
    };
    let mut a = stream("team-a", "app", true, &["prod", "v1.2_3-rc"]);
    a.access.allow.push("team-*".into());
    a.access.deny.push("team-x".into());
    Snapshot::new([
        a,
        stream("team-b", "nginx", true, &["latest"]),
        stream("ops", "tool.x", false, &["latest"]),
    ])
}

/// A name accepted by a validator is safe as a store key, a path component and a log value.
pub fn assert_safe_name(what: &str, s: &str) {
    assert!(!s.is_empty(), "{what}: empty {s:?} accepted");
    assert!(s.len() <= 253, "{what}: {} bytes accepted", s.len());
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')),
        "{what}: {s:?} accepted"
    );
    assert!(
        s != "." && s != ".." && !s.starts_with('.'),
        "{what}: {s:?} accepted"
    );
}

pub fn assert_tag_ref(t: &TagRef) {
    assert_safe_name("namespace", &t.namespace);
    assert_safe_name("stream", &t.name);
    assert_safe_name("tag", &t.tag);
    assert!(!t.namespace.contains('.'), "namespace {:?}", t.namespace);
}

/// A resolution to a pinned image names a tag that exists, with its current digest, and a pod
/// namespace the stream allows.
pub fn assert_pinned(snapshot: &Snapshot, p: &Pinned, namespace: Option<&str>) {
    let stream = snapshot
        .get(&StreamKey::new(&p.tag.namespace, &p.tag.name))
        .expect("pinned to a stream that does not exist");
    let current = stream.tags[&p.tag.tag]
        .current()
        .expect("a current generation");
    assert_eq!(p.digest, current.digest);
    assert_eq!(p.reference, current.reference);
    if let Some(ns) = namespace.filter(|n| !n.is_empty()) {
        assert!(stream.allows(ns), "{ns} is not allowed to use {}", p.tag);
    }
}
