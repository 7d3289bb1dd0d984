//! Manifest and index bytes as a registry (or the cache on disk) gives them: the children the
//! cache pins and prefetches (`cache::pins::children`) and the media type the mirror serves
//! (`registry::manifest_media_type`). Manifests are capped at 4 MiB before they are parsed.
#![no_main]

use imagestream::cache::pins::children;
use imagestream::registry::{manifest_media_type, MAX_MANIFEST_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_MANIFEST_BYTES {
        return;
    }
    let media_type = manifest_media_type(data);
    assert!(!media_type.is_empty());

    let all = children(data, false);
    let mine = children(data, true);
    match (&all, &mine) {
        (Ok(all), Ok(mine)) => {
            // This platform's manifests are some of the index's, in order; blobs are the same.
            assert!(mine.manifests.len() <= all.manifests.len());
            let mut rest = all.manifests.iter();
            for d in &mine.manifests {
                assert!(rest.any(|a| a == d), "{d} is not a child of the index");
            }
            assert_eq!(mine.blobs, all.blobs);
            if !all.manifests.is_empty() {
                assert!(
                    !mine.manifests.is_empty(),
                    "an index yields at least one manifest"
                );
            }
            // Every child is a valid digest: safe as a file name in the content store.
            for d in all.manifests.iter().chain(&all.blobs) {
                assert_eq!(d.hex().len(), 64);
                assert!(d
                    .hex()
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            }
            // (Not asserted: that `data` is valid JSON. serde_json skips ignored fields without
            // checking their UTF-8, and the bytes are served as they are, verified by digest.)
        }
        (Err(_), Err(_)) => {}
        // An index whose entry for another platform is unusable: this platform's manifests are
        // still found (and `pins::pinned` falls back to them).
        (Err(_), Ok(mine)) => assert!(!mine.manifests.is_empty()),
        (Ok(_), Err(e)) => panic!("this platform's children fail where all succeed: {e}"),
    }
});
