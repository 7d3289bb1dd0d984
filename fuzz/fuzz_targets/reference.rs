//! Image references as pods, the CLI and the admin API give them: the stream grammar
//! (classify, NS/NAME:TAG, names), digests and image ids, the registry reference parser
//! (docker normalisation) and resolution through a small snapshot.
#![no_main]

#[path = "common.rs"]
mod common;

use imagestream::registry::{check_sha256_digest, Digest, RegistryClient, MAX_REFERENCE_LEN};
use imagestream::stream::names::{validate_namespace, validate_stream_name, validate_tag};
use imagestream::stream::reference::{
    classify, is_image_id, parse_stream_key, parse_tag_ref, Classified, DEFAULT_STREAM_HOST,
};
use imagestream::stream::resolve::{resolve, Resolution};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const H: &str = DEFAULT_STREAM_HOST;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    // The stream grammar: what is accepted renders back to itself.
    match classify(s, H) {
        Ok(Classified::Stream(t)) => {
            common::assert_tag_ref(&t);
            let again = format!("{H}/{t}");
            assert_eq!(
                classify(&again, H),
                Ok(Classified::Stream(t.clone())),
                "{again}"
            );
            // The host is case-insensitive; the rest is not.
            let upper = format!("{}/{t}", H.to_ascii_uppercase());
            assert_eq!(classify(&upper, H), Ok(Classified::Stream(t)));
        }
        Ok(Classified::ShortName { name, tag }) => {
            common::assert_safe_name("stream", &name);
            common::assert_safe_name("tag", &tag);
            assert!(
                !s.contains('/') && !s.contains('@'),
                "{s:?} is a short name"
            );
            assert_eq!(
                classify(&format!("{name}:{tag}"), H),
                Ok(Classified::ShortName { name, tag })
            );
        }
        Ok(Classified::Other) => {}
        Err(e) => {
            // A malformed stream reference names itself in the error, and only ours are errors.
            assert!(e.to_string().contains("invalid stream reference"));
            assert!(
                s.get(..H.len()).is_some_and(|p| p.eq_ignore_ascii_case(H)),
                "{s:?}: {e}"
            );
        }
    }
    if let Ok(t) = parse_tag_ref(s) {
        common::assert_tag_ref(&t);
        assert_eq!(t.to_string(), s);
    }
    if let Ok((ns, name)) = parse_stream_key(s) {
        common::assert_safe_name("namespace", &ns);
        common::assert_safe_name("stream", &name);
        assert_eq!(format!("{ns}/{name}"), s);
    }
    if validate_namespace(s).is_ok() {
        common::assert_safe_name("namespace", s);
        assert!(s.len() <= 63 && !s.contains('.'));
    }
    if validate_stream_name(s).is_ok() {
        common::assert_safe_name("stream", s);
    }
    if validate_tag(s).is_ok() {
        common::assert_safe_name("tag", s);
        assert!(s.len() <= 128);
    }

    // Digests: only sha256 and 64 lowercase hex digits, safe as a file name.
    let digest_ok = check_sha256_digest(s).is_ok();
    match Digest::parse(s) {
        Ok(d) => {
            assert!(digest_ok);
            assert_eq!(d.as_str(), s);
            assert_eq!(d.to_string(), s);
            assert_eq!(d.hex().len(), 64);
            assert!(d
                .hex()
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            assert!(is_image_id(s));
        }
        Err(e) => {
            assert!(!digest_ok);
            assert!(e.contains("sha256"));
        }
    }

    // The registry reference parser (oci-client, docker normalisation, lowercase repositories).
    if let Ok(r) = RegistryClient::parse(s) {
        assert!(s.len() <= MAX_REFERENCE_LEN);
        assert!(!r.registry().is_empty() && !r.repository().is_empty());
        assert!(!r.repository().chars().any(|c| c.is_ascii_uppercase()));
        // What a pin stores (`registry/repository@digest`) parses back to the same place: the
        // cache's prefetch and the CRI proxy parse it again.
        let pinned = format!("{}/{}@{}", r.registry(), r.repository(), common::DIGEST);
        let p = RegistryClient::parse(&pinned)
            .unwrap_or_else(|e| panic!("pinned reference {pinned:?} of {s:?}: {e}"));
        assert_eq!(p.registry(), r.registry(), "{pinned}");
        assert_eq!(p.repository(), r.repository(), "{pinned}");
        assert_eq!(p.digest(), Some(common::DIGEST));
    }

    // Resolution, as the CRI proxy does it for a pod of a namespace (or none).
    static SNAPSHOT: OnceLock<imagestream::stream::resolve::Snapshot> = OnceLock::new();
    let snapshot = SNAPSHOT.get_or_init(common::snapshot);
    for ns in [
        None,
        Some("team-a"),
        Some("team-b"),
        Some("team-x"),
        Some("other"),
    ] {
        match resolve(snapshot, H, s, ns) {
            Ok(Resolution::Pinned(p)) => common::assert_pinned(snapshot, &p, ns),
            Ok(Resolution::PassThrough) => {
                assert!(!matches!(classify(s, H), Ok(Classified::Stream(_))))
            }
            Ok(Resolution::NeedsNamespace { .. }) => assert!(ns.is_none()),
            Err(_) => {}
        }
    }
});
