//! Hostile registries (issue 8, §2): fake, fault-injecting registries ([`common::hostile`],
//! [`common::origin`]) against the real daemon, on both paths that talk to registries — pinning
//! (`imagestream tag set` / `tag import`) and the mirror's pull-through fill (plain HTTP to the
//! daemon's mirror port; containerd would add only its own fallback to the registry).
//!
//! Asserted for every shape: nothing wrong is committed (every file under `blobs/sha256`
//! hashes to its name, the bad digest has no file, no tag is pinned or moved), errors name the
//! digest, cached tags keep resolving, and a registry that is down fails within the deadlines
//! of `imagestream::registry` with a message that starts with `RegistryUnavailable`.
//! Results and figures: docs/reliability.md, "Hostile registries".

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::auth::{docker_config_json, HtpasswdRegistry};
use common::daemon::Daemon;
use common::hostile::*;
use common::mirror::{http_fetch, verify_store, HttpResponse};
use common::origin::{FaultInjectingOrigin, FaultMode};
use common::*;
use imagestream::registry::{MANIFEST_DEADLINE, MAX_MANIFEST_BYTES, RESPONSE_TIMEOUT};

const MANIFEST_ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
/// Slack on top of a deadline for process start-up, the CLI and a loaded machine.
const SLACK: Duration = Duration::from_secs(8);
const STREAM: &str = "hostile/app";

/// A daemon whose only upstream is `registry` (plain HTTP), with `config` as its config file.
fn daemon(registry: &str, config: &str) -> Daemon {
    let d = Daemon::start_with_config("unix:///nonexistent.sock", &[registry], &[], config);
    d.cli_ok(&["stream", "create", STREAM]);
    d
}

/// `imagestream ARGS` that must fail: (stderr, elapsed).
fn cli_fails(d: &Daemon, args: &[&str]) -> (String, Duration) {
    let t = Instant::now();
    let out = d.cli(args);
    let elapsed = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "imagestream {args:?} succeeded against a hostile registry: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        d.log_tail()
    );
    (stderr, elapsed)
}

fn mirror_get(
    d: &Daemon,
    upstream: &str,
    path: &str,
    timeout: Duration,
) -> (Result<HttpResponse, String>, Duration) {
    let t = Instant::now();
    let accept = [("Accept", MANIFEST_ACCEPT)];
    let r = http_fetch(
        &d.mirror_addr,
        "GET",
        &format!("{path}?ns={upstream}"),
        &accept,
        &[],
        timeout,
    );
    (r, t.elapsed())
}

fn manifest_path(reference: &str) -> String {
    format!("/v2/app/manifests/{reference}")
}

fn blob_path(digest: &str) -> String {
    format!("/v2/app/blobs/{digest}")
}

/// Every stored file hashes to its name, and none is named `bad`.
fn assert_nothing_wrong_committed(d: &Daemon, bad: &[&str], when: &str) {
    let store =
        verify_store(&d.state_dir).unwrap_or_else(|e| panic!("{when}: {e}\n{}", d.log_tail()));
    for b in bad {
        assert!(
            !store.contains_key(*b),
            "{when}: {b} was committed to the store: {store:?}\n{}",
            d.log_tail()
        );
    }
}

/// The tag does not exist (nothing was pinned).
fn assert_not_pinned(d: &Daemon, tag: &str) {
    let out = d.cli(&["tag", "history", &format!("{STREAM}:{tag}")]);
    assert!(
        !out.status.success(),
        "tag {tag} was pinned: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The current digest of a tag and its number of generations.
fn current(d: &Daemon, tag: &str) -> (String, usize) {
    let h = d.cli_json(&["tag", "history", &format!("{STREAM}:{tag}")]);
    let gens = h["generations"].as_array().map_or(0, |a| a.len());
    (
        h["generations"][0]["digest"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        gens,
    )
}

/// Error response from the mirror (not 200), or a body cut short; never a complete body that
/// does not hash to `digest`. Returns the response text when there was one.
fn assert_not_served(r: &Result<HttpResponse, String>, digest: &str, d: &Daemon) -> String {
    match r {
        Ok(resp) if resp.status == 200 => {
            panic!(
                "the mirror served {} bytes for {digest} (hashing to {}) from a hostile registry\n{}",
                resp.body.len(),
                sha256(&resp.body),
                d.log_tail()
            )
        }
        Ok(resp) => resp.body_text(),
        Err(e) => e.clone(),
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An honest fake registry serving `img` as `app:v1`, a daemon that pinned `hostile/app:prod`
/// to it, prefetched it and resolved `v1` through its mirror once.
fn cached_bed(img: &FakeImage, config: &str) -> (Arc<FakeHostileRegistry>, Daemon) {
    let honest = img.clone();
    let fake = Arc::new(FakeHostileRegistry::start(move |r| {
        honest.honest("v1", r).unwrap_or_else(FakeAnswer::not_found)
    }));
    let d = daemon(&fake.addr, config);
    d.cli_ok(&[
        "tag",
        "set",
        &format!("{STREAM}:prod"),
        &format!("{}/app:v1", fake.addr),
    ]);
    wait_until(
        "the prefetch of the pinned image",
        Duration::from_secs(30),
        || {
            let store = verify_store(&d.state_dir).unwrap_or_default();
            img.blobs().iter().all(|b| store.contains_key(b))
        },
    );
    let (r, _) = mirror_get(
        &d,
        &fake.addr,
        &manifest_path("v1"),
        Duration::from_secs(10),
    );
    let r = r.unwrap_or_else(|e| panic!("honest mirror GET v1: {e}\n{}", d.log_tail()));
    assert_eq!(r.status, 200, "{}", r.body_text());
    (fake, d)
}

/// The mirror still answers `v1` with the cached digest: (elapsed).
fn assert_cached_tag_resolves(
    d: &Daemon,
    fake: &str,
    img: &FakeImage,
    within: Duration,
) -> Duration {
    let (r, elapsed) = mirror_get(d, fake, &manifest_path("v1"), within + SLACK);
    let r = r.unwrap_or_else(|e| {
        panic!(
            "mirror GET v1 with the upstream hostile: {e}\n{}",
            d.log_tail()
        )
    });
    assert_eq!(
        r.status,
        200,
        "cached tag v1 no longer resolves: {}\n{}",
        r.body_text(),
        d.log_tail()
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.digest().as_str())
    );
    assert_eq!(sha256(&r.body), img.digest());
    assert!(elapsed <= within + SLACK, "cached tag took {elapsed:?}");
    elapsed
}

#[test]
fn manifest_bytes_matching_neither_the_requested_digest_nor_the_header_are_refused() {
    let img = FakeImage::new("app", &[1000]);
    let other = FakeImage::new("app", &[1000]);
    let (served, claimed) = (img.clone(), other.digest());
    let fake = FakeHostileRegistry::start(move |r| {
        match r.manifest() {
            // By tag: the header claims another digest than the bytes hash to.
            Some((_, "v1")) => FakeAnswer::bytes(
                200,
                &[
                    ("Content-Type", OCI_MANIFEST),
                    ("Docker-Content-Digest", &claimed),
                ],
                served.manifest.clone(),
            ),
            // By digest: bytes of another manifest (and a header agreeing with the request).
            Some((_, d)) if d == claimed => FakeAnswer::bytes(
                200,
                &[
                    ("Content-Type", OCI_MANIFEST),
                    ("Docker-Content-Digest", &claimed),
                ],
                served.manifest.clone(),
            ),
            _ => served.honest("v1", r).unwrap_or_else(FakeAnswer::not_found),
        }
    });
    let d = daemon(&fake.addr, "");

    // (a) pinning
    let (e, _) = cli_fails(
        &d,
        &[
            "tag",
            "set",
            &format!("{STREAM}:t"),
            &format!("{}/app:v1", fake.addr),
        ],
    );
    assert!(
        e.contains(&other.digest())
            && e.contains(&img.digest())
            && e.contains("Docker-Content-Digest"),
        "{e}"
    );
    assert_not_pinned(&d, "t");
    let (e, _) = cli_fails(
        &d,
        &[
            "tag",
            "set",
            &format!("{STREAM}:d"),
            &format!("{}/app@{}", fake.addr, other.digest()),
        ],
    );
    assert!(e.contains(&format!("asked for {}", other.digest())), "{e}");
    assert_not_pinned(&d, "d");

    // (b) the mirror, by digest and by tag (nothing cached for the tag yet)
    for reference in [other.digest(), "v1".to_string()] {
        let (r, _) = mirror_get(
            &d,
            &fake.addr,
            &manifest_path(&reference),
            Duration::from_secs(20),
        );
        let text = assert_not_served(&r, &other.digest(), &d);
        assert_eq!(r.as_ref().map(|r| r.status).ok(), Some(502), "{text}");
        assert!(
            text.contains(&other.digest()),
            "the error does not name the digest: {text}"
        );
    }
    assert_nothing_wrong_committed(
        &d,
        &[&other.digest(), &img.digest()],
        "after the mismatches",
    );
    assert!(d.metric("imagestream_digest_mismatches_total") >= 2.0);
}

#[test]
fn a_media_type_differing_from_content_type_is_refused() {
    let img = FakeImage::new("app", &[1000]);
    let served = img.clone();
    let fake = FakeHostileRegistry::start(move |r| match r.manifest() {
        // A manifest served as an index (digest and header are right).
        Some(_) => FakeAnswer::bytes(
            200,
            &[
                ("Content-Type", OCI_INDEX),
                ("Docker-Content-Digest", &served.digest()),
            ],
            served.manifest.clone(),
        ),
        None => served.honest("v1", r).unwrap_or_else(FakeAnswer::not_found),
    });
    let d = daemon(&fake.addr, "");
    let (e, _) = cli_fails(
        &d,
        &[
            "tag",
            "set",
            &format!("{STREAM}:t"),
            &format!("{}/app:v1", fake.addr),
        ],
    );
    assert!(
        e.contains("mediaType") && e.contains(OCI_INDEX) && e.contains(&img.digest()),
        "{e}"
    );
    assert_not_pinned(&d, "t");
    let (r, _) = mirror_get(
        &d,
        &fake.addr,
        &manifest_path(&img.digest()),
        Duration::from_secs(20),
    );
    let text = assert_not_served(&r, &img.digest(), &d);
    assert!(
        text.contains(&img.digest()) && text.contains("mediaType"),
        "{text}"
    );
    assert_nothing_wrong_committed(&d, &[&img.digest()], "after the media type mismatch");
}

#[test]
fn a_manifest_over_4_mib_is_refused_while_reading() {
    // A JSON manifest of 5 MiB (an annotation full of padding).
    let big = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"pad":"{}"}}}}"#,
        "x".repeat(5 << 20)
    )
    .into_bytes();
    let big_digest = sha256(&big);
    let (b, bd) = (big.clone(), big_digest.clone());
    let fake = FakeHostileRegistry::start(move |r| match r.manifest() {
        // Announced: Content-Length 5 MiB.
        Some((_, "declared")) => {
            FakeAnswer::bytes(200, &[("Content-Type", OCI_MANIFEST)], b.clone())
        }
        Some((_, d)) if d == bd => {
            FakeAnswer::bytes(200, &[("Content-Type", OCI_MANIFEST)], b.clone())
        }
        // Not announced: an endless chunked body.
        Some((_, "endless")) => {
            FakeAnswer::with_body(200, &[("Content-Type", OCI_MANIFEST)], FakeBody::Endless)
        }
        _ => FakeAnswer::not_found(),
    });
    let d = daemon(&fake.addr, "");
    let limit = format!("{MAX_MANIFEST_BYTES}-byte limit");
    for tag in ["declared", "endless"] {
        let (e, elapsed) = cli_fails(
            &d,
            &[
                "tag",
                "set",
                &format!("{STREAM}:{tag}"),
                &format!("{}/app:{tag}", fake.addr),
            ],
        );
        assert!(e.contains(&limit), "{tag}: {e}");
        assert!(elapsed < Duration::from_secs(10), "{tag}: {elapsed:?}");
        assert_not_pinned(&d, tag);
        eprintln!("4 MiB cap, {tag}: refused in {elapsed:?}");
    }
    let (r, _) = mirror_get(
        &d,
        &fake.addr,
        &manifest_path(&big_digest),
        Duration::from_secs(20),
    );
    let text = assert_not_served(&r, &big_digest, &d);
    assert!(text.contains(&limit), "{text}");
    let (r, _) = mirror_get(
        &d,
        &fake.addr,
        &manifest_path("endless"),
        Duration::from_secs(20),
    );
    let text = assert_not_served(&r, "endless", &d);
    assert!(text.contains(&limit), "{text}");
    // The endless bodies stopped: the daemon read no more than the cap (plus socket buffers).
    std::thread::sleep(Duration::from_secs(1));
    let sent = fake.body_bytes_sent();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        sent,
        fake.body_bytes_sent(),
        "the daemon keeps reading an endless manifest"
    );
    eprintln!("4 MiB cap: {sent} body bytes left the fake registry for 4 refused fetches");
    assert_nothing_wrong_committed(&d, &[&big_digest], "after the oversized manifests");
}

#[test]
fn an_index_whose_child_is_served_as_the_index_itself_caches_nothing_for_the_child() {
    // A sha256 index cannot contain its own digest; a hostile registry can only answer for the
    // child with the index's own bytes (a loop if believed).
    let img = FakeImage::new("app", &[1000]);
    let child = img.digest();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": img.manifest.len()}],
    }))
    .expect("index JSON");
    let index_digest = sha256(&index);
    let (i, id, c) = (index.clone(), index_digest.clone(), child.clone());
    let fake = FakeHostileRegistry::start(move |r| match r.manifest() {
        Some((_, reference)) if reference == "loop" || reference == id || reference == c => {
            // For the child too: the index, claiming to be the child.
            let claimed = if reference == c {
                c.clone()
            } else {
                id.clone()
            };
            FakeAnswer::bytes(
                200,
                &[
                    ("Content-Type", OCI_INDEX),
                    ("Docker-Content-Digest", &claimed),
                ],
                i.clone(),
            )
        }
        _ => FakeAnswer::not_found(),
    });
    let d = daemon(&fake.addr, "");
    // The index itself is sound: it is pinned; the prefetch that follows stops at the child.
    d.cli_ok(&[
        "tag",
        "set",
        &format!("{STREAM}:loop"),
        &format!("{}/app:loop", fake.addr),
    ]);
    wait_until(
        "the prefetch to fail on the child",
        Duration::from_secs(30),
        || {
            d.log_text()
                .lines()
                .any(|l| l.contains("prefetch failed") && l.contains(&child))
        },
    );
    let (r, _) = mirror_get(
        &d,
        &fake.addr,
        &manifest_path(&child),
        Duration::from_secs(20),
    );
    let text = assert_not_served(&r, &child, &d);
    assert!(
        text.contains(&child) && text.contains(&index_digest),
        "{text}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let asked = fake.count(&manifest_path(&child));
    assert!(asked <= 3, "the child was asked for {asked} times: a loop");
    let store = verify_store(&d.state_dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        store.contains_key(&index_digest),
        "the sound index was not cached: {store:?}"
    );
    assert_nothing_wrong_committed(&d, &[&child], "after the self-referring index");
}

#[test]
fn truncated_overlong_and_mislabelled_blobs_are_never_committed() {
    let img = FakeImage::new("app", &[200_000, 200_001, 200_002, 200_003, 200_004]);
    let layers: Vec<String> = (0..5).map(|i| img.layer_digest(i)).collect();
    let (served, l) = (img.clone(), layers.clone());
    let fake = Arc::new(FakeHostileRegistry::start(move |r| {
        let Some((_, digest)) = r.blob() else {
            return served.honest("v1", r).unwrap_or_else(FakeAnswer::not_found);
        };
        let Some(i) = l.iter().position(|x| x == digest) else {
            return FakeAnswer::not_found();
        };
        let data = served.layers[i].clone();
        let n = data.len() as u64;
        let body = match i {
            // Truncated: half the bytes, then close.
            0 => FakeBody::Bytes {
                data: data[..data.len() / 2].to_vec(),
                declared: Some(n),
            },
            // Longer than the blob (no length): the blob and then more.
            1 => FakeBody::Chunked([data, vec![0u8; 1000]].concat()),
            // Content-Length smaller than the blob.
            2 => FakeBody::Bytes {
                data,
                declared: Some(n - 100),
            },
            // Content-Length larger than the blob.
            3 => FakeBody::Bytes {
                data,
                declared: Some(n + 100),
            },
            // Endless, no length.
            _ => FakeBody::Endless,
        };
        FakeAnswer::with_body(200, &[("Content-Type", "application/octet-stream")], body)
    }));
    let d = daemon(&fake.addr, "cache_max_bytes = 16777216\n");
    for (i, digest) in layers.iter().enumerate() {
        let (r, elapsed) = mirror_get(&d, &fake.addr, &blob_path(digest), Duration::from_secs(60));
        let text = assert_not_served(&r, digest, &d);
        eprintln!(
            "blob shape {i}: {elapsed:?}: {}",
            text.chars().take(200).collect::<String>()
        );
    }
    // Every failure is logged naming its digest.
    wait_until(
        "a failure logged for each blob",
        Duration::from_secs(20),
        || {
            let log = d.log_text();
            layers.iter().all(|l| {
                log.lines()
                    .any(|x| x.contains("nothing cached") && x.contains(l.as_str()))
            })
        },
    );
    let log = d.log_text();
    for (digest, cause) in layers.iter().zip([
        "after 100000 of 200000 bytes",
        "hash to",
        "hash to",
        "after 200003 of 200103",
        "over 67108864 bytes",
    ]) {
        assert!(
            log.lines()
                .any(|x| x.contains(digest.as_str()) && x.contains(cause)),
            "no log line names {digest} with {cause:?}\n{}",
            d.log_tail()
        );
    }
    let bad: Vec<&str> = layers.iter().map(String::as_str).collect();
    assert_nothing_wrong_committed(&d, &bad, "after the bad blobs");
    wait_until("the ingest dir to empty", Duration::from_secs(10), || {
        files_under_ingest(&d).is_empty()
    });

    // The same digest from an honest upstream afterwards: fetched again and committed.
    let honest = img.clone();
    fake.set_handler(move |r| honest.honest("v1", r).unwrap_or_else(FakeAnswer::not_found));
    let (r, _) = mirror_get(
        &d,
        &fake.addr,
        &blob_path(&layers[0]),
        Duration::from_secs(20),
    );
    let r = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status, sha256(&r.body)), (200, layers[0].clone()));
}

fn files_under_ingest(d: &Daemon) -> Vec<(std::path::PathBuf, u64)> {
    common::mirror::files_under(&common::mirror::ingest_dir(&d.state_dir))
}

#[test]
fn a_registry_that_never_answers_fails_pins_and_uncached_pulls_within_the_deadline() {
    let img = FakeImage::new("app", &[1000, 2000]);
    let (fake, d) = cached_bed(&img, "");
    fake.set_handler(|_| FakeAnswer::Silence);
    let unknown = sha256(b"never cached");
    let d = Arc::new(d);
    let addr = fake.addr.clone();
    let pin = {
        let (d, addr) = (d.clone(), addr.clone());
        std::thread::spawn(move || {
            cli_fails(
                &d,
                &[
                    "tag",
                    "set",
                    &format!("{STREAM}:new"),
                    &format!("{addr}/app:v1"),
                ],
            )
        })
    };
    let blob = {
        let (d, addr, u) = (d.clone(), addr.clone(), unknown.clone());
        std::thread::spawn(move || mirror_get(&d, &addr, &blob_path(&u), RESPONSE_TIMEOUT + SLACK))
    };
    let manifest = {
        let (d, addr, u) = (d.clone(), addr.clone(), unknown.clone());
        std::thread::spawn(move || {
            mirror_get(&d, &addr, &manifest_path(&u), RESPONSE_TIMEOUT + SLACK)
        })
    };
    let cached = {
        let (d, addr, img) = (d.clone(), addr.clone(), img.clone());
        std::thread::spawn(move || assert_cached_tag_resolves(&d, &addr, &img, RESPONSE_TIMEOUT))
    };
    let (e, pin_elapsed) = pin.join().expect("pin thread");
    assert!(e.starts_with("error: RegistryUnavailable"), "{e}");
    assert!(
        pin_elapsed <= MANIFEST_DEADLINE + SLACK,
        "pin took {pin_elapsed:?}"
    );
    assert_not_pinned(&d, "new");
    for (what, handle) in [("blob", blob), ("manifest", manifest)] {
        let (r, elapsed) = handle.join().expect("mirror thread");
        let text = assert_not_served(&r, &unknown, &d);
        assert_eq!(
            r.as_ref().map(|r| r.status).ok(),
            Some(502),
            "{what}: {text}"
        );
        assert!(
            text.contains("RegistryUnavailable") && text.contains(&unknown),
            "{what}: {text}"
        );
        assert!(
            elapsed <= RESPONSE_TIMEOUT + SLACK,
            "{what} took {elapsed:?}"
        );
        eprintln!("never answers: uncached {what} failed in {elapsed:?}");
    }
    let cached_elapsed = cached.join().expect("cached thread");
    eprintln!(
        "never answers: pin failed in {pin_elapsed:?}; cached tag resolved in {cached_elapsed:?}"
    );
    // The stream tag keeps its digest and resolves without the registry.
    assert_eq!(current(&d, "prod"), (img.digest(), 1));
    let resolved = d.cli_json(&["resolve", &format!("imagestream.local/{STREAM}:prod")]);
    assert_eq!(resolved["digest"], img.digest().as_str(), "{resolved}");
    assert_nothing_wrong_committed(&d, &[&unknown], "after the silent registry");
}

#[test]
fn a_5xx_storm_fails_fast_with_registry_unavailable_and_cached_tags_keep_resolving() {
    let img = FakeImage::new("app", &[1000, 2000]);
    let (fake, d) = cached_bed(&img, "");
    // Every request: 503 with an endless error body.
    fake.set_handler(|_| {
        FakeAnswer::with_body(503, &[("Content-Type", "text/plain")], FakeBody::Endless)
    });
    let (e, elapsed) = cli_fails(
        &d,
        &[
            "tag",
            "set",
            &format!("{STREAM}:new"),
            &format!("{}/app:v1", fake.addr),
        ],
    );
    assert!(
        e.starts_with("error: RegistryUnavailable") && e.contains("503"),
        "{e}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "pin under a 5xx storm took {elapsed:?}"
    );
    assert_not_pinned(&d, "new");
    eprintln!("5xx storm: pin failed in {elapsed:?}");
    let (e, elapsed) = cli_fails(&d, &["tag", "import", &format!("{STREAM}:prod")]);
    assert!(e.contains("RegistryUnavailable"), "{e}");
    assert_eq!(
        current(&d, "prod"),
        (img.digest(), 1),
        "the import moved the tag"
    );
    eprintln!("5xx storm: import failed in {elapsed:?}");
    let cached = assert_cached_tag_resolves(&d, &fake.addr, &img, Duration::from_secs(2));
    eprintln!("5xx storm: cached tag resolved in {cached:?}");
    let unknown = sha256(b"never cached");
    let (r, elapsed) = mirror_get(
        &d,
        &fake.addr,
        &blob_path(&unknown),
        Duration::from_secs(20),
    );
    let text = assert_not_served(&r, &unknown, &d);
    assert!(
        text.contains("RegistryUnavailable") && text.contains(&unknown) && text.contains("503"),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    // Error bodies are read up to 64 KiB, not to their (endless) end.
    std::thread::sleep(Duration::from_secs(1));
    let sent = fake.body_bytes_sent();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        sent,
        fake.body_bytes_sent(),
        "the daemon keeps reading an endless error body"
    );
    assert_nothing_wrong_committed(&d, &[&unknown], "after the 5xx storm");
}

#[test]
fn a_very_slow_link_finishes_blobs_and_bounds_manifests() {
    let img = FakeImage::new("app", &[512 << 10]);
    let slow_manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"pad":"{}"}}}}"#,
        "y".repeat(64 << 10)
    )
    .into_bytes();
    let (served, m) = (img.clone(), slow_manifest.clone());
    let fake = FakeHostileRegistry::start(move |r| {
        if let Some((_, "slow")) = r.manifest() {
            // 64 KiB at 1 KiB/s: would take a minute.
            return FakeAnswer::with_body(
                200,
                &[("Content-Type", OCI_MANIFEST)],
                FakeBody::Trickle {
                    data: m.clone(),
                    bytes_per_sec: 1024,
                },
            );
        }
        if let Some((_, digest)) = r.blob() {
            if digest == served.layer_digest(0) {
                // 512 KiB at 128 KiB/s: four seconds, steadily.
                return FakeAnswer::with_body(
                    200,
                    &[],
                    FakeBody::Trickle {
                        data: served.layers[0].clone(),
                        bytes_per_sec: 128 << 10,
                    },
                );
            }
        }
        served.honest("v1", r).unwrap_or_else(FakeAnswer::not_found)
    });
    let d = Arc::new(daemon(&fake.addr, ""));
    let pin = {
        let (d, addr) = (d.clone(), fake.addr.clone());
        std::thread::spawn(move || {
            cli_fails(
                &d,
                &[
                    "tag",
                    "set",
                    &format!("{STREAM}:slow"),
                    &format!("{addr}/app:slow"),
                ],
            )
        })
    };
    let layer = img.layer_digest(0);
    let (r, blob_elapsed) = mirror_get(&d, &fake.addr, &blob_path(&layer), Duration::from_secs(60));
    let r = r.unwrap_or_else(|e| panic!("slow blob: {e}\n{}", d.log_tail()));
    assert_eq!((r.status, sha256(&r.body)), (200, layer.clone()));
    assert!(
        blob_elapsed >= Duration::from_secs(3),
        "the blob was not slow: {blob_elapsed:?}"
    );
    let (e, pin_elapsed) = pin.join().expect("pin thread");
    assert!(
        e.starts_with("error: RegistryUnavailable") && e.contains("no complete manifest within"),
        "{e}"
    );
    assert!(pin_elapsed <= MANIFEST_DEADLINE + SLACK, "{pin_elapsed:?}");
    assert_not_pinned(&d, "slow");
    eprintln!("slow link: 512 KiB blob at 128 KiB/s served in {blob_elapsed:?}; 64 KiB manifest at 1 KiB/s refused in {pin_elapsed:?}");
    let store = verify_store(&d.state_dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        store.contains_key(&layer),
        "the slow blob was not committed: {store:?}"
    );
    assert_nothing_wrong_committed(&d, &[&sha256(&slow_manifest)], "after the slow link");
}

const USER: &str = "puller";
const PASSWORD: &str = "h0stile-Pa55";

#[test]
fn a_redirect_to_another_loopback_port_carries_no_credentials() {
    let registry = Registry::start();
    let img = push_random_image_to(&registry.addr, "private/app:v1", &[64 << 10]);
    let auth = HtpasswdRegistry::start(&registry.dir.join("data"), USER, PASSWORD);
    // The recorder serves the blobs (read from the plain registry) and records every header.
    let plain = registry.addr.clone();
    let recorder = FakeHostileRegistry::start(move |r| match r.blob() {
        Some((name, digest)) => {
            match http_request(&plain, "GET", &format!("/v2/{name}/blobs/{digest}"), &[]) {
                Some((200, data)) => FakeAnswer::bytes(200, &[], data),
                _ => FakeAnswer::not_found(),
            }
        }
        None => FakeAnswer::not_found(),
    });
    // The registry (with htpasswd) behind an origin that redirects every blob GET there.
    let origin = FaultInjectingOrigin::start(&auth.addr, FaultMode::RedirectBlobs(recorder.url()));
    let dir = tempfile::tempdir().expect("tempdir");
    let auth_file = dir.path().join("auth.json");
    std::fs::write(&auth_file, docker_config_json(&origin.addr, USER, PASSWORD))
        .expect("write auth.json");
    let d = daemon(
        &origin.addr,
        &format!(
            "registry_auth_file = {:?}\n",
            auth_file.display().to_string()
        ),
    );

    // (a) pinning and its prefetch; (b) the mirror.
    d.cli_ok(&[
        "tag",
        "set",
        &format!("{STREAM}:prod"),
        &format!("{}/private/app:v1", origin.addr),
    ]);
    for b in [img.config.clone(), img.layers[0].0.clone()] {
        let (r, _) = http_fetch_blob(&d, &origin.addr, &b);
        assert_eq!(
            (r.status, sha256(&r.body)),
            (200, b.clone()),
            "{}",
            d.log_tail()
        );
    }
    wait_until("the prefetch", Duration::from_secs(20), || {
        let store = verify_store(&d.state_dir).unwrap_or_default();
        img.blobs().iter().all(|b| store.contains_key(b))
    });

    let sent_auth = origin.requests().iter().filter(|r| r.authorization).count();
    let redirected = origin.requests().iter().filter(|r| r.status == 307).count();
    assert!(
        sent_auth > 0,
        "no request carried credentials to the registry: {:?}",
        origin.requests()
    );
    assert!(
        redirected > 0,
        "no blob GET was redirected: {:?}",
        origin.requests()
    );
    let reached = recorder.requests();
    assert!(!reached.is_empty(), "the redirect was not followed");
    let with_auth: Vec<_> = reached
        .iter()
        .filter(|r| r.authorization.is_some())
        .collect();
    assert!(
        with_auth.is_empty(),
        "Authorization reached another port: {with_auth:?}"
    );
    eprintln!(
        "redirect: {sent_auth} authenticated requests to the registry, {redirected} redirects, {} requests at the other port, 0 with Authorization",
        reached.len()
    );
    assert!(!d.log_text().contains(PASSWORD));
}

fn http_fetch_blob(d: &Daemon, upstream: &str, digest: &str) -> (HttpResponse, Duration) {
    let (r, t) = mirror_get(
        d,
        upstream,
        &format!("/v2/private/app/blobs/{digest}"),
        Duration::from_secs(20),
    );
    (
        r.unwrap_or_else(|e| panic!("mirror GET blob {digest}: {e}\n{}", d.log_tail())),
        t,
    )
}

#[test]
fn foreign_layer_urls_are_never_followed() {
    let recorder = FakeHostileRegistry::start(|_| FakeAnswer::bytes(200, &[], b"foreign".to_vec()));
    let base = FakeImage::new("app", &[1000, 2000]);
    let manifest = FakeImage::manifest_for(
        &base.config,
        &base.layers,
        &[(1, format!("{}/layer.tar.gz", recorder.url()))],
    );
    let img = FakeImage { manifest, ..base };
    let foreign = img.layer_digest(1);
    let expected = format!("Basic {}", {
        let json = docker_config_json("x", USER, PASSWORD);
        json.split("\"auth\":\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_string()
    });
    let (served, f) = (img.clone(), foreign.clone());
    // A registry requiring credentials that does not have the foreign layer.
    let fake = FakeHostileRegistry::start(move |r| {
        if r.authorization.as_deref() != Some(expected.as_str()) {
            return FakeAnswer::bytes(
                401,
                &[("WWW-Authenticate", "Basic realm=\"fake\"")],
                b"{}".to_vec(),
            );
        }
        match r.blob() {
            Some((_, d)) if d == f => FakeAnswer::bytes(
                404,
                &[],
                br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#.to_vec(),
            ),
            _ => served.honest("v1", r).unwrap_or_else(FakeAnswer::not_found),
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let auth_file = dir.path().join("auth.json");
    std::fs::write(&auth_file, docker_config_json(&fake.addr, USER, PASSWORD))
        .expect("write auth.json");
    let d = daemon(
        &fake.addr,
        &format!(
            "registry_auth_file = {:?}\n",
            auth_file.display().to_string()
        ),
    );
    d.cli_ok(&[
        "tag",
        "set",
        &format!("{STREAM}:prod"),
        &format!("{}/app:v1", fake.addr),
    ]);
    wait_until(
        "the prefetch to stop at the foreign layer",
        Duration::from_secs(30),
        || {
            d.log_text()
                .lines()
                .any(|l| l.contains("prefetch failed") && l.contains(&foreign))
        },
    );
    let (r, _) = mirror_get(
        &d,
        &fake.addr,
        &blob_path(&foreign),
        Duration::from_secs(20),
    );
    let text = assert_not_served(&r, &foreign, &d);
    assert_eq!(r.as_ref().map(|r| r.status).ok(), Some(404), "{text}");
    assert!(
        fake.requests().iter().any(|r| r.authorization.is_some()),
        "credentials were never used"
    );
    assert!(
        recorder.requests().is_empty(),
        "a foreign URL was fetched: {:?}",
        recorder.requests()
    );
    assert_nothing_wrong_committed(&d, &[&foreign], "after the foreign layer");
}
