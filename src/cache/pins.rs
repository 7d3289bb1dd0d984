//! What the cache must keep: the roots are the current image of every stream tag and its last
//! few earlier digests (`pin_history`), with the signature manifests that verified them; from each root, an index leads to its manifests, a manifest to its config and layers. Everything so
//! reachable (and present) is pinned and never evicted.

use super::store::ContentStore;
use crate::registry::Digest;
use crate::stream::resolve::Snapshot;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A stream tag's current image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub digest: Digest,
    /// `registry/repository@sha256:…`, where the image comes from.
    pub reference: String,
    /// `namespace/stream:tag` of every tag whose current image this is.
    pub pinned_by: Vec<String>,
}

/// The images the cache keeps, one entry per digest: every stream tag's current image
/// (pinned by `ns/stream:tag`) and its last `history` distinct earlier digests (pinned by
/// `ns/stream:tag@generation N`), so that a rollback finds them on the node.
pub fn roots(snapshot: &Snapshot, history: usize) -> Vec<Root> {
    let mut by_digest: BTreeMap<Digest, Root> = BTreeMap::new();
    for stream in snapshot.streams() {
        for tag in stream.tags.values() {
            let Some(current) = tag.current() else {
                continue;
            };
            let name = format!("{}/{}:{}", stream.namespace, stream.name, tag.name);
            let mut seen: Vec<&str> = Vec::new();
            for g in &tag.generations {
                if seen.contains(&g.digest.as_str()) {
                    continue;
                }
                if seen.len() > history {
                    break;
                }
                seen.push(&g.digest);
                let Ok(digest) = Digest::parse(&g.digest) else {
                    continue;
                };
                let label = if g.digest == current.digest {
                    name.clone()
                } else {
                    format!("{name}@generation {}", g.generation)
                };
                // The signature manifest that verified it, so that the check can be made
                // again (a rollback, `tag verify`) with the registry down.
                let signature = g
                    .verification
                    .as_ref()
                    .and_then(|v| Digest::parse(&v.signature).ok())
                    .zip(g.reference.split_once('@'));
                if let Some((sig, (repository, _))) = signature {
                    by_digest
                        .entry(sig.clone())
                        .or_insert_with(|| Root {
                            reference: format!("{repository}@{sig}"),
                            digest: sig,
                            pinned_by: Vec::new(),
                        })
                        .pinned_by
                        .push(format!("{label} (signature)"));
                }
                by_digest
                    .entry(digest.clone())
                    .or_insert_with(|| Root {
                        digest,
                        reference: g.reference.clone(),
                        pinned_by: Vec::new(),
                    })
                    .pinned_by
                    .push(label);
            }
        }
    }
    by_digest.into_values().collect()
}

/// Whether the store holds everything needed to run `digest` on this node: the manifest (or
/// index and this platform's manifest), the config and every layer.
pub fn holds(store: &ContentStore, digest: &Digest) -> bool {
    let mut queue = vec![digest.clone()];
    let mut seen: HashSet<Digest> = HashSet::new();
    while let Some(d) = queue.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        if seen.len() > super::MAX_MANIFESTS_PER_IMAGE {
            return false;
        }
        let Ok(Some(bytes)) = store.read_small(&d, super::MAX_MANIFEST_BYTES) else {
            return false;
        };
        let Ok(c) = children(&bytes, true) else {
            return false;
        };
        if c.blobs.iter().any(|b| !store.contains(b)) {
            return false;
        }
        queue.extend(c.manifests);
    }
    true
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct AnyManifest {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// What a manifest points at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Children {
    pub manifests: Vec<Digest>,
    pub blobs: Vec<Digest>,
}

/// The node's platform as OCI names it.
pub fn node_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

/// The children of manifest `bytes`. With `this_platform`, an index yields only the manifests
/// for the node's platform (all of them when none names a platform).
pub fn children(bytes: &[u8], this_platform: bool) -> Result<Children, String> {
    let m: AnyManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let digest = |d: &Descriptor| Digest::parse(&d.digest);
    let mut out = Children::default();
    let (os, arch) = node_platform();
    let wanted: Vec<&Descriptor> = if this_platform
        && m.manifests.iter().any(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == arch)
        }) {
        m.manifests
            .iter()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == os && p.architecture == arch)
            })
            .collect()
    } else {
        m.manifests.iter().collect()
    };
    for d in wanted {
        out.manifests.push(digest(d)?);
    }
    for d in m.config.iter().chain(m.layers.iter()) {
        out.blobs.push(digest(d)?);
    }
    Ok(out)
}

/// Every stored blob reachable from the roots, with the tags that reach it.
pub fn pinned(
    snapshot: &Snapshot,
    history: usize,
    store: &ContentStore,
) -> HashMap<Digest, Vec<String>> {
    let mut out: HashMap<Digest, Vec<String>> = HashMap::new();
    for root in roots(snapshot, history) {
        let mut reached: HashSet<Digest> = HashSet::new();
        let mut queue = vec![root.digest.clone()];
        while let Some(d) = queue.pop() {
            if !reached.insert(d.clone()) {
                continue;
            }
            if let Ok(Some(bytes)) = store.read_small(&d, super::MAX_MANIFEST_BYTES) {
                // An index whose entry for another platform is unusable (a sha512 digest) is
                // still this node's image: pin at least what `holds` and prefetch follow.
                if let Ok(c) = children(&bytes, false).or_else(|_| children(&bytes, true)) {
                    queue.extend(c.manifests);
                    reached.extend(c.blobs);
                }
            }
        }
        for d in reached.into_iter().filter(|d| store.contains(d)) {
            let names = out.entry(d).or_default();
            for n in &root.pinned_by {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_of_index_and_manifest() {
        let (os, arch) = node_platform();
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let index = format!(
            r#"{{"manifests":[{{"digest":"{a}","platform":{{"os":"{os}","architecture":"{arch}"}}}},{{"digest":"{b}","platform":{{"os":"windows","architecture":"x"}}}}]}}"#
        );
        let c = children(index.as_bytes(), true).expect("index");
        assert_eq!(c.manifests, vec![Digest::parse(&a).expect("d")]);
        assert_eq!(
            children(index.as_bytes(), false)
                .expect("index")
                .manifests
                .len(),
            2
        );
        let manifest = format!(r#"{{"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}}]}}"#);
        let c = children(manifest.as_bytes(), true).expect("manifest");
        assert_eq!(c.blobs.len(), 2);
        assert!(children(br#"{"layers":[{"digest":"sha256:../x"}]}"#, true).is_err());
    }

    /// Found by the `manifest` fuzz target: an index with an entry for another platform that
    /// has no sha256 digest yields this platform's children, but pinned nothing, so the node's
    /// current image could be evicted although `holds` said it was complete.
    #[test]
    fn index_with_an_unusable_foreign_entry_still_pins_this_platform() {
        use crate::stream::model::{NewGeneration, Stream, StreamKey, Tag};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let (os, arch) = node_platform();
        let (config, layer) = (b"{}".to_vec(), b"layer".to_vec());
        let manifest = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            Digest::of(&config),
            Digest::of(&layer)
        );
        let index = format!(
            r#"{{"manifests":[{{"digest":"{}","platform":{{"os":"{os}","architecture":"{arch}"}}}},{{"digest":"sha512:{}","platform":{{"os":"windows","architecture":"{arch}"}}}}]}}"#,
            Digest::of(manifest.as_bytes()),
            "a".repeat(128)
        );
        for bytes in [
            &config,
            &layer,
            &manifest.clone().into_bytes(),
            &index.clone().into_bytes(),
        ] {
            store.put(&Digest::of(bytes), bytes).expect("put");
        }
        let root = Digest::of(index.as_bytes());
        assert!(holds(&store, &root));
        let mut stream = Stream::new(&StreamKey::new("team-a", "app"), false);
        let mut tag = Tag {
            name: "prod".into(),
            source: "r.example/app:v1".into(),
            generations: Vec::new(),
            schedule: None,
            condition: None,
        };
        tag.push(
            NewGeneration {
                digest: root.to_string(),
                reference: format!("r.example/app@{root}"),
                created: "now".into(),
                cause: "set".into(),
                source: tag.source.clone(),
                verification: None,
            },
            20,
        );
        stream.tags.insert("prod".into(), tag);
        let pins = pinned(&Snapshot::new([stream]), 3, &store);
        for bytes in [&config, &layer, &manifest.into_bytes(), &index.into_bytes()] {
            assert!(pins.contains_key(&Digest::of(bytes)), "not pinned");
        }
    }
}
