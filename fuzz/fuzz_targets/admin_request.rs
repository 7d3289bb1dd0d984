//! Admin API requests as they arrive on the admin socket (protobuf), through the checks made
//! before anything is looked up, stored or fetched: the adapter's (`admin::check_*`,
//! `admin::tag_ref`, `admin::namespace_filter`) and then the stream service's (names, access
//! patterns, the source reference), and `Resolve` through a small snapshot.
//! Input: one byte for the request kind, then the request's protobuf encoding.
#![no_main]

#[path = "common.rs"]
mod common;

use imagestream::admin::pb;
use imagestream::admin::{
    check_cache_digest, check_resolve, check_set_tag, check_watch, namespace_filter, tag_ref,
};
use imagestream::registry::{check_sha256_digest, RegistryClient};
use imagestream::stream::model::{validate_access_pattern, StreamKey};
use imagestream::stream::reference::{classify, parse_tag_ref, Classified, DEFAULT_STREAM_HOST};
use imagestream::stream::resolve::{resolve, Resolution, Snapshot};
use imagestream::stream::service::validate_key;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::OnceLock;

const H: &str = DEFAULT_STREAM_HOST;
const MIN_INTERVAL: u64 = 30;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 8 {
        0 => {
            // CreateStream, GetStream, DeleteStream: the service checks the key.
            let Ok(r) = pb::CreateStreamRequest::decode(body) else {
                return;
            };
            stream_key(&r.namespace, &r.name);
        }
        1 => {
            let Ok(r) = pb::ListStreamsRequest::decode(body) else {
                return;
            };
            if let Ok(Some(ns)) = namespace_filter(&r.namespace) {
                common::assert_safe_name("namespace", ns);
            }
        }
        2 => {
            let Ok(r) = pb::UpdateStreamAccessRequest::decode(body) else {
                return;
            };
            let mut ok = true;
            for p in r.allow.iter().chain(&r.deny).chain(&r.remove) {
                if validate_access_pattern(p).is_ok() {
                    assert!(!p.is_empty() && p.len() <= 63, "{p:?}");
                    assert!(!p.contains('/') && !p.contains('.'), "{p:?}");
                } else {
                    ok = false;
                }
            }
            if ok {
                stream_key(&r.namespace, &r.name);
            }
        }
        3 => {
            let Ok(r) = pb::SetTagRequest::decode(body) else {
                return;
            };
            let Ok((t, schedule)) = check_set_tag(&r, MIN_INTERVAL) else {
                return;
            };
            common::assert_safe_name("tag", &t.tag);
            assert!(!r.source.is_empty());
            assert_eq!(schedule.is_some(), r.scheduled);
            if let Some(s) = schedule {
                assert!(s.interval_secs >= MIN_INTERVAL);
            }
            if stream_key(&t.namespace, &t.name) {
                source(&r.source);
            }
        }
        4 => {
            // RollbackTag, GetTag, ImportTag, DeleteTag.
            let Ok(r) = pb::GetTagRequest::decode(body) else {
                return;
            };
            let Ok(t) = tag_ref(r.namespace, r.name, r.tag) else {
                return;
            };
            common::assert_safe_name("tag", &t.tag);
            if stream_key(&t.namespace, &t.name) {
                common::assert_tag_ref(&t);
                assert_eq!(parse_tag_ref(&t.to_string()).as_ref(), Ok(&t));
            }
        }
        5 => {
            let Ok(r) = pb::ResolveRequest::decode(body) else {
                return;
            };
            let Ok(ns) = check_resolve(&r) else {
                return;
            };
            assert!(!r.reference.is_empty());
            static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
            let snapshot = SNAPSHOT.get_or_init(common::snapshot);
            match resolve(snapshot, H, &r.reference, ns) {
                Ok(Resolution::Pinned(p)) => common::assert_pinned(snapshot, &p, ns),
                Ok(Resolution::NeedsNamespace { .. }) => assert!(ns.is_none()),
                Ok(Resolution::PassThrough) | Err(_) => {}
            }
        }
        6 => {
            let Ok(r) = pb::WatchRequest::decode(body) else {
                return;
            };
            if check_watch(&r).is_ok() {
                assert!(r.name.is_empty() || !r.namespace.is_empty());
            }
        }
        _ => {
            let Ok(r) = pb::RemoveCacheBlobRequest::decode(body) else {
                return;
            };
            if let Ok(d) = check_cache_digest(&r.digest) {
                assert_eq!(d.as_str(), r.digest);
                assert!(check_sha256_digest(&r.digest).is_ok());
            }
        }
    }
});

/// The stream service's check of a stream key; true when accepted.
fn stream_key(namespace: &str, name: &str) -> bool {
    let key = StreamKey::new(namespace, name);
    if validate_key(&key).is_err() {
        return false;
    }
    common::assert_safe_name("namespace", namespace);
    common::assert_safe_name("stream", name);
    assert!(!namespace.contains('.'));
    true
}

/// The stream service's check of a `tag set` source before anything is fetched: a stream
/// reference must be well-formed, anything else must parse as a registry reference (with a
/// sha256 digest, if any).
fn source(source: &str) {
    match classify(source, H) {
        Err(_) => {}
        Ok(Classified::Stream(t)) => common::assert_tag_ref(&t),
        Ok(_) => {
            if let Ok(r) = RegistryClient::parse(source) {
                if let Some(d) = r.digest() {
                    let _ = check_sha256_digest(d);
                }
                assert!(!r.repository().is_empty());
            }
        }
    }
}
