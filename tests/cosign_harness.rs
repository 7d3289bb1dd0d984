//! Smoke test of the cosign harness (`common::cosign`): the real cosign signs an image in the
//! test registry in its legacy layout (a `sha256-<hex>.sig` manifest whose one layer is the
//! simple-signing payload with the signature in an annotation), accepts that signature, and
//! rejects each forgery the harness can publish: a genuine signature of another image, a
//! changed payload under the original signature, and a changed signature of the original
//! payload.
//!
//! Needs `cosign` from `bash scripts/test-tools.sh cosign` (see `common::tools::tool`),
//! `docker-registry`, `umoci` and `skopeo`; cosign reaches nothing but the loopback registry.

mod common;

use common::cosign::{
    copy_signature, corrupt_signature, sign, signature_manifest, signature_tag, tamper_payload,
    verify, verify_result, CosignKey, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE,
};
use common::{push_random_image_to, registry_manifest, Registry};

/// Asserts that the signature of `digest` in `repo` has cosign's legacy shape: an OCI or Docker
/// image manifest under `sha256-<hex>.sig` with one simple-signing layer, whose payload names
/// `digest` and which carries a base64 signature annotation.
fn assert_legacy_signature(reg: &Registry, repo: &str, digest: &str) {
    let manifest = signature_manifest(&reg.addr, repo, digest);
    eprintln!(
        "signature manifest {repo}:{}:\n{manifest:#}",
        signature_tag(digest)
    );
    let media_type = manifest["mediaType"].as_str().unwrap_or("");
    assert!(
        media_type == "application/vnd.oci.image.manifest.v1+json"
            || media_type == "application/vnd.docker.distribution.manifest.v2+json",
        "signature manifest media type {media_type:?}: {manifest}"
    );
    let layers = manifest["layers"]
        .as_array()
        .expect("signature manifest has layers");
    assert_eq!(layers.len(), 1, "one signature layer: {manifest}");
    let layer = &layers[0];
    assert_eq!(
        layer["mediaType"].as_str(),
        Some(SIMPLE_SIGNING_MEDIA_TYPE),
        "{manifest}"
    );
    let signature = layer["annotations"][SIGNATURE_ANNOTATION]
        .as_str()
        .unwrap_or_else(|| panic!("no {SIGNATURE_ANNOTATION} annotation: {manifest}"));
    assert!(
        !signature.is_empty()
            && signature
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        "signature annotation is not base64: {signature:?}"
    );
    let payload_digest = layer["digest"].as_str().expect("payload layer digest");
    let payload = common::http_request(
        &reg.addr,
        "GET",
        &format!("/v2/{repo}/blobs/{payload_digest}"),
        &[],
    );
    let Some((200, payload)) = payload else {
        panic!("GET payload {payload_digest}: {payload:?}");
    };
    let claims: serde_json::Value =
        serde_json::from_slice(&payload).expect("the simple-signing payload is JSON");
    eprintln!("payload: {claims}");
    assert_eq!(
        claims["critical"]["type"].as_str(),
        Some("cosign container image signature"),
        "{claims}"
    );
    assert_eq!(
        claims["critical"]["image"]["docker-manifest-digest"].as_str(),
        Some(digest),
        "{claims}"
    );
    assert_eq!(
        claims["critical"]["identity"]["docker-reference"].as_str(),
        Some(format!("{}/{repo}", reg.addr).as_str()),
        "{claims}"
    );
}

/// Asserts that cosign rejects `image`, with a reason that contains `why`.
fn assert_rejected(key: &CosignKey, image: &str, why: &str) {
    match verify_result(key, image) {
        Ok(out) => panic!("cosign verify accepted {image}: {out}"),
        Err(reason) => assert!(
            reason.contains(why),
            "cosign verify rejected {image}, but not for {why:?}: {reason}"
        ),
    }
    assert!(!verify(key, image));
}

#[test]
fn cosign_signs_and_verifies_in_the_test_registry() {
    let reg = Registry::start();
    let repo = "app";
    let a = push_random_image_to(&reg.addr, "app:a", &[1024]).digest;
    let b = push_random_image_to(&reg.addr, "app:b", &[1024]).digest;
    let c = push_random_image_to(&reg.addr, "app:c", &[1024]).digest;
    let image = |digest: &str| format!("{}/{repo}@{digest}", reg.addr);
    let key = CosignKey::generate();

    sign(&key, &image(&a));
    sign(&key, &image(&c));
    assert_legacy_signature(&reg, repo, &a);
    // Legacy layout only: no referrers tag (registry 2.8 has no referrers API).
    let tags = common::http_request(&reg.addr, "GET", &format!("/v2/{repo}/tags/list"), &[]);
    let Some((200, tags)) = tags else {
        panic!("GET tags/list: {tags:?}");
    };
    let tags: serde_json::Value = serde_json::from_slice(&tags).expect("tags/list is JSON");
    let mut tags: Vec<&str> = tags["tags"]
        .as_array()
        .expect("tags/list has tags")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    tags.sort_unstable();
    let mut expected = vec![
        "a".to_string(),
        "b".to_string(),
        "c".to_string(),
        signature_tag(&a),
        signature_tag(&c),
    ];
    expected.sort_unstable();
    assert_eq!(tags, expected, "tags after signing a and c");
    assert!(verify(&key, &image(&a)), "cosign rejects its own signature");
    assert!(verify(&key, &image(&c)), "cosign rejects its own signature");
    // An unsigned image, and a signed one with another key.
    assert_rejected(&key, &image(&b), "no signatures found");
    let other = CosignKey::generate();
    assert_rejected(&other, &image(&a), "invalid signature");

    // A genuine signature of a, published as b's: b is rejected, a still accepted.
    copy_signature(&reg.addr, repo, &a, &b);
    assert_eq!(
        registry_manifest(&reg.addr, repo, &signature_tag(&b)),
        registry_manifest(&reg.addr, repo, &signature_tag(&a))
    );
    assert_rejected(&key, &image(&b), "invalid or missing digest in claim");
    assert!(verify(&key, &image(&a)));

    // a's payload changed under its original signature.
    tamper_payload(&reg.addr, repo, &a);
    assert_rejected(&key, &image(&a), "invalid signature");

    // c's signature changed, its payload kept.
    corrupt_signature(&reg.addr, repo, &c);
    assert_rejected(&key, &image(&c), "invalid signature");
}
