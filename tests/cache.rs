//! The node's layer cache and registry mirror against the real runtime of the test bed
//! (containerd 2 or 1.6, or CRI-O) and a real registry: containerd's hosts.toml (written by
//! `imagestream mirror hosts-toml`) or CRI-O's registries.conf drop-in (`imagestream mirror
//! registries-conf`) sends its pulls through the mirror, and to the registry itself when the
//! mirror is down; the mirror fills a content store of verified blobs, serves from it with the
//! origin gone, refuses bytes that do not match their digest, fetches each blob from the origin
//! once however many pulls ask at the same time, survives kill -9 mid-ingest without a partial
//! blob, and never evicts what a stream tag pins.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::mirror::*;
use common::origin::{FaultInjectingOrigin, FaultMode};
use common::*;

const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// CRI PullImage through the daemon's CRI socket (the kubelet's path), bounded.
async fn pull(d: &Daemon, image: &str) -> Result<String, tonic::Status> {
    match tokio::time::timeout(PULL_TIMEOUT, cri_pull_image(&d.cri_socket, image)).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "test: PullImage {image} did not finish within {PULL_TIMEOUT:?}"
        ))),
    }
}

/// PullImage that must succeed; the panic shows the error and the daemon's log.
async fn pull_ok(d: &Daemon, image: &str, what: &str) -> String {
    pull(d, image)
        .await
        .unwrap_or_else(|e| panic!("{what}: PullImage {image} failed: {e}\n{}", d.log_tail()))
}

/// `imagestream cache ls -o json` as digest -> entry.
fn cache_ls(d: &Daemon) -> BTreeMap<String, serde_json::Value> {
    let ls = d.cli_json(&["cache", "ls"]);
    let entries = ls
        .as_array()
        .unwrap_or_else(|| panic!("cache ls -o json is not an array: {ls}"));
    entries
        .iter()
        .map(|e| {
            let digest = e["digest"]
                .as_str()
                .unwrap_or_else(|| panic!("cache ls entry without digest: {e}"));
            (digest.to_string(), e.clone())
        })
        .collect()
}

fn pinned_by(entry: &serde_json::Value) -> Vec<String> {
    entry["pinned_by"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Every blob in the store re-hashes to its name; panics with the offenders and the log.
fn verified_store(d: &Daemon, when: &str) -> BTreeMap<String, u64> {
    verify_store(&d.state_dir).unwrap_or_else(|e| panic!("{when}: {e}\n{}", d.log_tail()))
}

fn describe(img: &RandomImage, digest: &str) -> String {
    if digest == img.digest {
        "manifest".into()
    } else if digest == img.config {
        "config".into()
    } else {
        match img.layers.iter().position(|(l, _)| l == digest) {
            Some(i) => format!("layer {i}"),
            None => "unknown blob".into(),
        }
    }
}

fn assert_image_in_store(d: &Daemon, img: &RandomImage, store: &BTreeMap<String, u64>, when: &str) {
    for b in img.blobs() {
        assert!(
            store.contains_key(&b),
            "{when}: {} {b} is not in {}; the store holds {store:?}\n{}",
            describe(img, &b),
            blobs_dir(&d.state_dir).display(),
            d.log_tail()
        );
    }
}

/// The runtime tries the mirror first and falls back to the origin itself when the mirror
/// fails (containerd: the `server` of hosts.toml; CRI-O: the `[[registry]]` location); such a
/// fallback would hide a broken mirror, so tests check that the origin saw no blob fetch but
/// imagestream's.
fn assert_no_fallback_to_origin(registry: &Registry, d: &Daemon, when: &str) {
    let direct = registry.blob_gets_not_by("imagestream/");
    assert!(
        direct.is_empty(),
        "{when}: the runtime fetched {} blob(s) from the origin itself instead of through the \
         mirror (the mirror failed them): {direct:?}\n{}",
        direct.len(),
        d.log_tail()
    );
}

/// What the bed's runtime answers a pull of `reference` (`HOST/REPO:TAG` or `HOST/REPO@DIGEST`)
/// of `img` with: containerd the image id (the config digest), CRI-O `HOST/REPO@<manifest
/// digest>`. RemoveImage takes either form back.
fn pulled_ref(kind: RuntimeKind, reference: &str, img: &RandomImage) -> String {
    if kind.is_containerd() {
        return img.config.clone();
    }
    let name = reference.split('@').next().unwrap_or(reference);
    let name = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    format!("{name}@{}", img.digest)
}

/// Registry + runtime + daemon whose mirror the runtime uses for `registry`.
fn bed(config: Option<&str>) -> (Daemon, RuntimeBed, Registry) {
    let registry = Registry::start();
    let ctd = RuntimeBed::start_with_registry_addr(&registry.addr);
    let d = match config {
        Some(c) => Daemon::start_with_config(&ctd.endpoint(), &[&registry.addr], &[], c),
        None => Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]),
    };
    let hosts = d.route_through_mirror(&ctd, &registry.addr);
    assert!(
        hosts.contains(&d.mirror_addr) && hosts.contains(&registry.addr),
        "the mirror config for {} names neither the mirror {} nor the registry:\n{hosts}",
        registry.addr,
        d.mirror_url()
    );
    (d, ctd, registry)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_through_the_mirror_fills_the_cache_with_verified_blobs() {
    let (d, ctd, registry) = bed(None);
    let img = push_random_image_to(&registry.addr, "app:v1", &[MIB, 2 * MIB, 300 * KIB]);

    let reference = registry.image_ref("app:v1");
    let image_id = pull_ok(&d, &reference, "first pull").await;
    assert_eq!(
        image_id,
        pulled_ref(ctd.kind, &reference, &img),
        "PullImage returned another image"
    );
    assert_no_fallback_to_origin(&registry, &d, "first pull");

    let store = verified_store(&d, "after the first pull");
    assert_image_in_store(&d, &img, &store, "after the first pull");

    // `cache ls` lists exactly what is on disk, with the sizes on disk.
    let ls = cache_ls(&d);
    let listed: BTreeMap<String, u64> = ls
        .iter()
        .map(|(k, v)| (k.clone(), v["size"].as_u64().unwrap_or(u64::MAX)))
        .collect();
    assert_eq!(
        listed, store,
        "cache ls (left) differs from blobs/ on disk (right)"
    );
    for (digest, e) in &ls {
        assert!(
            e.get("last_used").is_some() && e["pinned_by"].is_array(),
            "cache ls entry {digest} lacks last_used or pinned_by: {e}"
        );
    }

    // The origin served each blob once; the mirror counted misses and upstream fetches.
    assert_no_fallback_to_origin(&registry, &d, "20 concurrent PullImage");
    let gets = registry.blob_gets();
    for b in img.blobs().iter().skip(1) {
        assert_eq!(
            gets.get(b).copied().unwrap_or(0),
            1,
            "origin GETs of {} {b}: {gets:?}",
            describe(&img, b)
        );
    }
    let upstream_bytes = registry.blob_bytes_served();
    let image_bytes = img.total_size();
    eprintln!(
        "origin blob bytes {upstream_bytes} / image size {image_bytes} = {:.3}",
        upstream_bytes as f64 / image_bytes as f64
    );
    let metrics = d.metrics();
    let m = |name: &str| {
        metric_value(&metrics, name).unwrap_or_else(|| panic!("{name} not in /metrics:\n{metrics}"))
    };
    assert!(m("imagestream_cache_misses_total") >= 1.0, "{metrics}");
    assert!(
        m("imagestream_upstream_fetches_total") >= img.layers.len() as f64,
        "fewer upstream fetches than layers:\n{metrics}"
    );
    let layer_bytes: u64 = img.layers.iter().map(|(_, s)| s).sum();
    assert!(
        m("imagestream_cache_bytes_served_total{source=\"upstream\"}") >= layer_bytes as f64,
        "bytes served from upstream < {layer_bytes} layer bytes:\n{metrics}"
    );
    assert_eq!(
        m("imagestream_cache_size_bytes"),
        store.values().sum::<u64>() as f64,
        "cache size metric differs from the bytes in blobs/:\n{metrics}"
    );
    assert_eq!(m("imagestream_digest_mismatches_total"), 0.0, "{metrics}");

    // The mirror speaks the distribution API: Range on a cached blob, and push is refused.
    let (layer, _) = &img.layers[1];
    let ns = format!("ns={}", registry.addr);
    let r = http_fetch(
        &d.mirror_addr,
        "GET",
        &format!("/v2/app/blobs/{layer}?{ns}"),
        &[("Range", "bytes=100-1123")],
        &[],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("Range GET on the mirror: {e}\n{}", d.log_tail()));
    let on_disk = std::fs::read(blob_path(&d.state_dir, layer)).expect("read cached layer");
    assert_eq!(r.status, 206, "Range GET status; headers {:?}", r.headers);
    assert!(
        r.body == on_disk[100..1124],
        "Range GET bytes=100-1123 returned {} bytes that differ from the blob's",
        r.body.len()
    );
    let pushes = |log: Vec<AccessLogEntry>| {
        log.into_iter()
            .filter(|e| matches!(e.method.as_str(), "POST" | "PUT" | "PATCH"))
            .count()
    };
    let pushes_before = pushes(registry.access_log());
    let r = http_fetch(
        &d.mirror_addr,
        "POST",
        &format!("/v2/app/blobs/uploads/?{ns}"),
        &[],
        &[],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("POST upload on the mirror: {e}"));
    assert!(
        r.status >= 400,
        "the mirror accepted a push (POST blobs/uploads/): {} {}",
        r.status,
        r.body_text()
    );
    assert_eq!(
        pushes(registry.access_log()),
        pushes_before,
        "a push reached the origin through the mirror"
    );
}

/// Pull once, remove the image from containerd, stop the origin, pull `again` (a reference
/// built from the image) from the cache alone.
async fn pull_again_with_origin_down(again: impl Fn(&Registry, &RandomImage) -> String) {
    let (d, ctd, mut registry) = bed(None);
    let img = push_random_image_to(&registry.addr, "app:v1", &[MIB, 512 * KIB]);
    let first = pull_ok(&d, &registry.image_ref("app:v1"), "first pull").await;
    assert_no_fallback_to_origin(&registry, &d, "first pull");
    let store = verified_store(&d, "after the first pull");
    assert_image_in_store(&d, &img, &store, "after the first pull");

    // containerd deletes the image's last reference synchronously, with a GC of its content.
    cri_remove_image(&d.cri_socket, &first)
        .await
        .unwrap_or_else(|e| panic!("RemoveImage {first}: {e}"));
    registry.stop();
    assert!(
        http_get_status(&registry.addr, "/v2/").is_none(),
        "the origin still answers"
    );

    let hits = d.metric("imagestream_cache_hits_total");
    let reference = again(&registry, &img);
    let id = pull(&d, &reference).await.unwrap_or_else(|e| {
        panic!(
            "pull of {reference} with the origin down failed: {e}\nmetrics:\n{}\n{}",
            d.metrics(),
            d.log_tail()
        )
    });
    assert_eq!(id, pulled_ref(ctd.kind, &reference, &img));
    let hits_after = d.metric("imagestream_cache_hits_total");
    assert!(
        hits_after > hits,
        "cache hits did not grow ({hits} -> {hits_after}) although the origin is down"
    );
    eprintln!(
        "served from cache: {} bytes; hits {hits} -> {hits_after}",
        d.metric("imagestream_cache_bytes_served_total{source=\"cache\"}")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn b_with_the_origin_down_a_pull_by_digest_comes_from_the_cache() {
    pull_again_with_origin_down(|r, img| format!("{}/app@{}", r.addr, img.digest)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn b_with_the_origin_down_a_pull_by_tag_comes_from_the_cache() {
    pull_again_with_origin_down(|r, _| r.image_ref("app:v1")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn c_an_origin_serving_wrong_bytes_fails_the_pull_and_caches_nothing_for_that_digest() {
    let registry = Registry::start();
    let img = push_random_image_to(&registry.addr, "app:v1", &[MIB, 256 * KIB]);
    let bad = img.layers[0].0.clone();
    let origin = FaultInjectingOrigin::start(&registry.addr, FaultMode::CorruptBlob(bad.clone()));
    let ctd = RuntimeBed::start_with_registry_addr(&registry.addr);
    let d = Daemon::start(&ctd.endpoint(), &[&origin.addr], &[]);
    d.route_through_mirror(&ctd, &origin.addr);

    let reference = origin.image_ref("app:v1");
    let err = match pull(&d, &reference).await {
        Ok(id) => panic!(
            "pull of {reference} succeeded ({id}) although the origin corrupted layer {bad}\n{}",
            d.log_tail()
        ),
        Err(e) => e,
    };
    // containerd names the layer it could not commit; CRI-O reports the cut-short body
    // ("unexpected EOF") and the 502 of its retry, without the digest.
    eprintln!("{} refused the pull: {}", ctd.kind.name(), err.message());
    if ctd.kind.is_containerd() {
        assert!(
            err.message().contains(&bad),
            "the pull error does not name the corrupted layer {bad}: {err}"
        );
    }
    let corrupted: Vec<_> = origin
        .requests()
        .into_iter()
        .filter(|r| r.corrupted)
        .collect();
    assert!(
        corrupted
            .iter()
            .any(|r| r.user_agent.starts_with("imagestream/")),
        "the mirror never received the corrupted blob from the origin; corrupted responses: \
         {corrupted:?}\nall origin requests: {:?}\n{}",
        origin.requests(),
        d.log_tail()
    );
    eprintln!("pull error: {err}\ncorrupted responses: {corrupted:?}");
    let store = verified_store(&d, "after the corrupted pull");
    assert!(
        !store.contains_key(&bad) && !blob_path(&d.state_dir, &bad).exists(),
        "the corrupted layer {bad} is in the store\n{}",
        d.log_tail()
    );
    assert!(
        !cache_ls(&d).contains_key(&bad),
        "cache ls lists the corrupted layer {bad}"
    );
    let mismatches = d.metric("imagestream_digest_mismatches_total");
    assert!(
        mismatches > 0.0,
        "imagestream_digest_mismatches_total is {mismatches}\n{}",
        d.log_tail()
    );

    // The mirror remembered nothing bad: once the origin serves the right bytes, so does it.
    origin.set_mode(FaultMode::PassThrough);
    let r = http_fetch(
        &d.mirror_addr,
        "GET",
        &format!("/v2/app/blobs/{bad}?ns={}", origin.addr),
        &[],
        &[],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| {
        panic!(
            "GET {bad} from the mirror after the fix: {e}\n{}",
            d.log_tail()
        )
    });
    assert_eq!(r.status, 200, "GET {bad} after the fix: {}", r.body_text());
    assert_eq!(
        sha256_bytes(&r.body),
        bad,
        "wrong bytes for {bad} after the fix"
    );
    let store = verified_store(&d, "after the origin was fixed");
    assert!(store.contains_key(&bad), "{bad} not cached after the fix");
}

#[tokio::test(flavor = "multi_thread")]
async fn d_concurrent_pulls_fetch_each_blob_from_the_origin_once() {
    let (d, ctd, registry) = bed(None);
    let img = push_random_image_to(&registry.addr, "app:v1", &[3 * MIB, 2 * MIB, MIB]);
    let img2 = push_random_image_to(&registry.addr, "app2:v1", &[2 * MIB, MIB]);

    // 20 kubelets' worth of PullImage at once.
    let reference = registry.image_ref("app:v1");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let socket = d.cri_socket.clone();
        let reference = reference.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(PULL_TIMEOUT, cri_pull_image(&socket, &reference)).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("pull task") {
            Ok(Ok(id)) => assert_eq!(id, pulled_ref(ctd.kind, &reference, &img), "pull {i}"),
            Ok(Err(e)) => panic!("concurrent pull {i} failed: {e}\n{}", d.log_tail()),
            Err(_) => panic!("concurrent pull {i} timed out\n{}", d.log_tail()),
        }
    }
    assert_no_fallback_to_origin(&registry, &d, "20 concurrent PullImage");
    let gets = registry.blob_gets();
    for b in img.blobs().iter().skip(1) {
        assert_eq!(
            gets.get(b).copied().unwrap_or(0),
            1,
            "20 concurrent PullImage: origin GETs of {} {b} (all origin blob GETs: {gets:?})",
            describe(&img, b)
        );
    }

    // The same straight at the mirror: 20 concurrent GETs of each uncached blob.
    let ns = registry.addr.clone();
    let mut threads = Vec::new();
    for b in img2.blobs().into_iter().skip(1) {
        for _ in 0..20 {
            let (addr, ns, b) = (d.mirror_addr.clone(), ns.clone(), b.clone());
            threads.push(std::thread::spawn(move || {
                let r = http_fetch(
                    &addr,
                    "GET",
                    &format!("/v2/app2/blobs/{b}?ns={ns}"),
                    &[],
                    &[],
                    Duration::from_secs(60),
                );
                (b, r)
            }));
        }
    }
    for t in threads {
        let (b, r) = t.join().expect("GET thread");
        let r = r.unwrap_or_else(|e| panic!("GET {b} from the mirror: {e}\n{}", d.log_tail()));
        assert_eq!(r.status, 200, "GET {b}: {}", r.body_text());
        assert_eq!(
            sha256_bytes(&r.body),
            b,
            "the mirror served wrong bytes for {b}"
        );
    }
    let gets = registry.blob_gets();
    for b in img2.blobs().iter().skip(1) {
        assert_eq!(
            gets.get(b).copied().unwrap_or(0),
            1,
            "20 concurrent blob GETs at the mirror: origin GETs of {} {b} (all: {gets:?})",
            describe(&img2, b)
        );
    }
    verified_store(&d, "after the concurrent pulls");
}

/// Waits until some file under `dir` holds at least `min` bytes; Err lists what is there.
fn wait_for_partial_file(dir: &Path, min: u64, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let files = files_under(dir);
        if files.iter().any(|(_, s)| *s >= min) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no file of >= {min} bytes under {} within {timeout:?}: {files:?}",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn e_kill_9_mid_ingest_leaves_no_partial_blob_and_the_next_pull_works() {
    let registry = Registry::start();
    let big = push_random_image_to(&registry.addr, "big:v1", &[64 * MIB]);
    let origin =
        FaultInjectingOrigin::start(&registry.addr, FaultMode::ThrottleBlobs(16 * MIB as u64));
    let ctd = RuntimeBed::start_with_registry_addr(&registry.addr);
    let mut d = Daemon::start(&ctd.endpoint(), &[&origin.addr], &[]);
    d.route_through_mirror(&ctd, &origin.addr);
    let reference = origin.image_ref("big:v1");

    let socket = d.cri_socket.clone();
    let r = reference.clone();
    let pulling = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(60), cri_pull_image(&socket, &r)).await
    });
    let ingest = ingest_dir(&d.state_dir);
    if let Err(e) = wait_for_partial_file(&ingest, MIB as u64, Duration::from_secs(30)) {
        panic!(
            "{e}\nstore: {:?}\n{}",
            files_under(&d.state_dir),
            d.log_tail()
        );
    }
    let partial = files_under(&ingest);
    d.kill9();
    eprintln!("killed imagestream with ingest/ holding {partial:?}");
    match pulling.await.expect("pull task") {
        Ok(Ok(id)) => panic!("the pull finished ({id}) although the daemon was killed"),
        Ok(Err(e)) => eprintln!("in-flight pull failed as expected: {e}"),
        Err(_) => panic!("the in-flight pull did not end within 60 s of kill -9"),
    }
    assert!(
        !files_under(&ingest).is_empty(),
        "kill -9 left ingest/ empty: the test did not catch an ingest in flight"
    );

    origin.set_mode(FaultMode::PassThrough);
    d.start_again();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !files_under(&ingest).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        files_under(&ingest).is_empty(),
        "ingest/ still holds {:?} 5 s after the restart\n{}",
        files_under(&ingest),
        d.log_tail()
    );
    verified_store(&d, "after kill -9 and restart");

    let before = origin.requests().len();
    // CRI-O joins a pull of an image to one in progress: its pull from before the kill may
    // still be retrying, and then fails this one with its own error. The kubelet pulls again
    // after a back-off; so does this test, a few times.
    let mut attempt = 1;
    let id = loop {
        match pull(&d, &reference).await {
            Ok(id) => break id,
            Err(e) if attempt < 3 && !ctd.kind.is_containerd() => {
                eprintln!("pull {attempt} after the restart failed, again in 2 s: {e}");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => panic!(
                "pull after kill -9 and restart: PullImage {reference} failed: {e}\n{}",
                d.log_tail()
            ),
        }
    };
    assert_eq!(id, pulled_ref(ctd.kind, &reference, &big));
    let direct: Vec<_> = origin.requests()[before..]
        .iter()
        .filter(|r| !r.user_agent.starts_with("imagestream/") && r.target.contains("/blobs/"))
        .cloned()
        .collect();
    assert!(
        direct.is_empty(),
        "after the restart the runtime fetched blobs from the origin itself (the mirror failed \
         them): {direct:?}\n{}",
        d.log_tail()
    );
    let store = verified_store(&d, "after the pull that followed the restart");
    assert_image_in_store(&d, &big, &store, "after the pull that followed the restart");
    let v = d.cli_json(&["cache", "verify"]);
    assert_eq!(
        v["evicted"],
        serde_json::json!([]),
        "cache verify evicted blobs: {v}"
    );
    assert!(
        v["checked"].as_u64().unwrap_or(0) >= big.blobs().len() as u64 && v["ok"] == v["checked"],
        "cache verify: {v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn f_eviction_under_a_small_limit_never_removes_a_pinned_blob() {
    let registry = Registry::start();
    let a = push_random_image_to(&registry.addr, "a:v1", &[MIB, MIB]);
    let b = push_random_image_to(&registry.addr, "b:v1", &[MIB, 512 * KIB]);
    let c = push_random_image_to(&registry.addr, "c:v1", &[MIB, 512 * KIB]);
    let limit = a.total_size() + 256 * KIB as u64;
    let ctd = RuntimeBed::start_with_registry_addr(&registry.addr);
    let d = Daemon::start_with_config(
        &ctd.endpoint(),
        &[&registry.addr],
        &[],
        &format!("cache_max_bytes = {limit}\n"),
    );
    d.route_through_mirror(&ctd, &registry.addr);

    // A stream tag on A: the daemon prefetches A and pins its blobs.
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&["tag", "set", "team-a/app:prod", &registry.image_ref("a:v1")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = cache_ls(&d);
        let missing: Vec<String> = a
            .blobs()
            .into_iter()
            .filter(|x| {
                !ls.get(x)
                    .map(|e| pinned_by(e).iter().any(|p| p == "team-a/app:prod"))
                    .unwrap_or(false)
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after `tag set`, these blobs of A are not cached and pinned by team-a/app:prod: \
             {missing:?}\ncache ls: {ls:?}\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // B and C through the mirror: together with A well over the limit.
    for (img, name) in [(&b, "b:v1"), (&c, "c:v1")] {
        let reference = registry.image_ref(name);
        let id = pull_ok(&d, &reference, name).await;
        assert_eq!(id, pulled_ref(ctd.kind, &reference, img));
        assert_no_fallback_to_origin(&registry, &d, &format!("pull of {name} under the limit"));
    }
    let gc = d.cli_json(&["cache", "gc"]);
    let ls = cache_ls(&d);
    let store = verified_store(&d, "after cache gc");
    for x in a.blobs() {
        let entry = ls.get(&x).unwrap_or_else(|| {
            panic!(
                "pinned {} {x} of A was evicted (gc: {gc})\ncache ls: {ls:?}\n{}",
                describe(&a, &x),
                d.log_tail()
            )
        });
        assert!(
            pinned_by(entry).iter().any(|p| p == "team-a/app:prod"),
            "{x} is no longer pinned by team-a/app:prod: {entry}"
        );
        assert!(
            store.contains_key(&x),
            "pinned {} {x} of A is listed but not in blobs/",
            describe(&a, &x)
        );
    }
    assert_eq!(gc["limit_bytes"].as_u64(), Some(limit), "cache gc: {gc}");
    let size = gc["size_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("cache gc without size_bytes: {gc}"));
    let only_pinned = ls.values().all(|e| !pinned_by(e).is_empty());
    assert!(
        size <= limit || only_pinned,
        "after gc the cache holds {size} bytes > limit {limit} with unpinned blobs left: {ls:?}"
    );
    assert_eq!(
        size,
        store.values().sum::<u64>(),
        "cache gc size_bytes differs from the bytes in blobs/ ({store:?})"
    );
    let evicted: HashMap<String, String> = b
        .blobs()
        .iter()
        .chain(c.blobs().iter())
        .filter(|x| !store.contains_key(*x))
        .map(|x| {
            (
                x.clone(),
                describe(if b.blobs().contains(x) { &b } else { &c }, x),
            )
        })
        .collect();
    eprintln!(
        "limit {limit}, size {size}, gc {gc}, B/C blobs not in the cache: {evicted:?}, evictions metric {}",
        d.metric("imagestream_cache_evictions_total")
    );
}

/// With imagestream (and so its mirror) stopped, the runtime still pulls, from the registry
/// itself: the fallback that `mirror hosts-toml` / `mirror registries-conf` write. Prints how
/// long the pull took against one through the mirror.
#[tokio::test(flavor = "multi_thread")]
async fn g_with_the_mirror_down_the_runtime_falls_back_to_the_registry() {
    let (mut d, ctd, registry) = bed(None);
    let img = push_random_image_to(&registry.addr, "app:v1", &[MIB]);
    let reference = registry.image_ref("app:v1");
    let started = Instant::now();
    let first = pull_ok(&d, &reference, "pull through the mirror").await;
    let through_mirror = started.elapsed();
    assert_eq!(first, pulled_ref(ctd.kind, &reference, &img));
    assert_no_fallback_to_origin(&registry, &d, "pull through the mirror");
    cri_remove_image(&d.cri_socket, &first)
        .await
        .unwrap_or_else(|e| panic!("RemoveImage {first}: {e}"));
    d.stop();

    let started = Instant::now();
    let id = cri_pull_image(&ctd.socket, &reference)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{} did not fall back to the registry with the mirror down: {e}",
                ctd.kind.name()
            )
        });
    let fallback = started.elapsed();
    assert_eq!(id, first);
    let direct = registry.blob_gets_not_by("imagestream/");
    assert!(
        !direct.is_empty(),
        "the pull succeeded but the origin saw no blob fetch by the runtime"
    );
    eprintln!(
        "{}: pull through the mirror {through_mirror:.2?}; with the mirror down, from the \
         registry {fallback:.2?} ({} blob GETs by {:?})",
        ctd.kind.name(),
        direct.len(),
        direct[0].user_agent
    );
}
