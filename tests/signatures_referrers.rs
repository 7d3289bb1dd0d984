//! Signatures stored as OCI 1.1 referrers, found through the registry's referrers API
//! (`GET /v2/<name>/referrers/<digest>`): the real cosign signs an image in a real registry with
//! the API, so no `sha256-<hex>` fallback tag is written, and imagestream must find and verify
//! that signature under an `enforce` policy. (The fallback index, for registries without the
//! API, is tested against docker-registry 2.8 in `signatures.rs`.)
//!
//! The registry is go-containerregistry's (`pkg/registry`, referrers API on): a real
//! implementation from the library cosign itself uses to talk to registries, so cosign writes
//! the referrer the way it would to any registry with the API. docker-registry 2.8, the other
//! tests' registry, lacks the API.
//!
//! Needs `referrers-registry` and `cosign` from `bash scripts/test-tools.sh` and the harness's
//! Debian packages.

mod common;

use common::cosign::{self, CosignKey};
use common::daemon::Daemon;
use common::mirror::http_fetch;
use common::referrers_registry::ReferrersRegistry;
use common::*;
use std::time::Duration;

/// The artifact type of a cosign signature stored as a referrer.
const COSIGN_SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// `GET /v2/<repo><path>` from the registry at `addr`, answered 200; the body parsed.
fn get_json(addr: &str, repo: &str, path: &str, accept: &str) -> serde_json::Value {
    let target = format!("/v2/{repo}{path}");
    let r = http_fetch(
        addr,
        "GET",
        &target,
        &[("Accept", accept)],
        &[],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("GET {target} from {addr}: {e}"));
    assert_eq!(r.status, 200, "GET {target} from {addr}: {}", r.body_text());
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("GET {target}: not JSON ({e}): {}", r.body_text()))
}

#[test]
fn signatures_stored_as_referrers_are_found_through_the_referrers_api() {
    require_root("the referrers signature test");
    let registry = ReferrersRegistry::start();
    let signed = push_random_image_to(&registry.addr, "app:v1", &[4096]);
    let unsigned = push_random_image_to(&registry.addr, "app:v2", &[4096]);
    let image = format!("{}/app@{}", registry.addr, signed.digest);
    let key = CosignKey::generate();
    cosign::sign_as_referrer(&key, &image);

    // The registry lists the signature through the referrers API ...
    let referrers = get_json(
        &registry.addr,
        "app",
        &format!("/referrers/{}", signed.digest),
        "application/vnd.oci.image.index.v1+json",
    );
    eprintln!("referrers of {}: {referrers}", signed.digest);
    assert_eq!(
        referrers["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{referrers}"
    );
    let manifests = referrers["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("referrers index without manifests: {referrers}"));
    assert_eq!(manifests.len(), 1, "{referrers}");
    assert_eq!(
        manifests[0]["artifactType"], COSIGN_SIGNATURE_ARTIFACT_TYPE,
        "{referrers}"
    );
    let signature = manifests[0]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("referrer without a digest: {referrers}"))
        .to_string();
    // ... and under no tag: neither cosign's legacy `.sig` nor the fallback `sha256-<hex>`,
    // so imagestream can only find it through the API.
    let tags = get_json(&registry.addr, "app", "/tags/list", "application/json");
    let fallback = format!("sha256-{}", signed.digest.trim_start_matches("sha256:"));
    let tag_names: Vec<&str> = tags["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("tags/list without tags: {tags}"))
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        tag_names.iter().all(|t| !t.starts_with(&fallback)),
        "cosign wrote a tag for the signature: {tags}"
    );
    assert!(
        cosign::verify_result_with(&key, &image, &["--experimental-oci11"]).is_ok(),
        "cosign accepts the referrer"
    );

    let before_daemon = registry.requests().len();
    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        "prefetch = false\n",
    );
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&[
        "stream",
        "policy",
        "team-a/app",
        "--key",
        &key.public.display().to_string(),
        "--mode",
        "enforce",
    ]);
    let out = d.cli(&["tag", "set", "team-a/app:prod", &image]);
    assert!(
        out.status.success(),
        "imagestream did not pin the signed image: {}\ndaemon log:\n{}\nregistry log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text(),
        registry.log_text()
    );
    let history = d.cli_json(&["tag", "history", "team-a/app:prod"]);
    let g = &history["generations"][0];
    assert_eq!(g["digest"], signed.digest.as_str(), "{g}");
    assert_eq!(g["verification"]["status"], "verified", "{g}");
    assert_eq!(g["verification"]["signature"], signature.as_str(), "{g}");
    // It asked the referrers API (after finding no `.sig` tag), the registry answered, and it
    // never asked for the fallback tag. (The registry logs no client: every request since the
    // daemon started is imagestream's.)
    let by_imagestream = registry.requests_since(before_daemon);
    eprintln!("imagestream's requests to the registry: {by_imagestream:#?}");
    let referrers_path = format!("/v2/app/referrers/{}", signed.digest);
    assert!(
        by_imagestream.iter().any(|r| r.method == "GET"
            && r.path.starts_with(&referrers_path)
            && r.error_status.is_none()),
        "imagestream did not GET {referrers_path}: {by_imagestream:#?}"
    );
    let fallback_path = format!("/v2/app/manifests/{fallback}");
    assert!(
        by_imagestream
            .iter()
            .all(|r| r.path.split('?').next() != Some(fallback_path.as_str())),
        "imagestream asked for the fallback tag {fallback}: {by_imagestream:#?}"
    );

    // An image without a signature (the referrers API answers an empty index) is refused.
    let out = d.cli(&[
        "tag",
        "set",
        "team-a/app:prod",
        &format!("{}/app@{}", registry.addr, unsigned.digest),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the unsigned image was pinned");
    assert!(err.contains("no signature"), "{err}");
    let history = d.cli_json(&["tag", "history", "team-a/app:prod"]);
    assert_eq!(
        history["generations"].as_array().map(Vec::len),
        Some(1),
        "{history}"
    );
}
