//! Issue 8, §3: broken disks, with the real daemon and a real docker-registry.
//!
//! - A byte flipped in a cached blob (and in a cached manifest) on disk is caught when served:
//!   the response is cut short, the blob evicted and fetched again on the next request; the
//!   scrub (`imagestream cache verify`) finds one that was not served.
//! - A full disk (the state dir is a small tmpfs, mounted for the test and unmounted on drop)
//!   during ingest and GC: a clear error (HTTP 507 naming "no space left"), no partial blob,
//!   pinned blobs untouched, cached blobs still served, and after space is freed a new pull
//!   works.
//!
//! Needs root (mount) and the harness's Debian packages.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::crash::*;
use common::daemon::Daemon;
use common::mirror::*;
use common::*;

const T: Duration = Duration::from_secs(30);

fn daemon(insecure: &[&str], config: &str) -> Daemon {
    Daemon::start_with_config("unix:///nonexistent/containerd.sock", insecure, &[], config)
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read the byte");
    b[0] ^= 0x20;
    f.write_all_at(&b, at).expect("write the byte");
    f.sync_all().expect("sync");
}

fn get_manifest(d: &Daemon, name: &str, digest: &str, upstream: &str) -> HttpResponse {
    http_fetch(
        &d.mirror_addr,
        "GET",
        &format!("/v2/{name}/manifests/{digest}?ns={upstream}"),
        &[],
        &[],
        T,
    )
    .unwrap_or_else(|e| panic!("GET manifest {digest}: {e}\n{}", d.log_tail()))
}

fn get_ok(d: &Daemon, name: &str, digest: &str, upstream: &str, what: &str) -> Vec<u8> {
    let r = mirror_get_blob(d, name, digest, upstream, T)
        .unwrap_or_else(|e| panic!("{what}: GET {digest}: {e}\n{}", d.log_tail()));
    assert_eq!(r.status, 200, "{what}: GET {digest}: {}", r.body_text());
    assert_eq!(
        sha256_bytes(&r.body),
        digest,
        "{what}: GET {digest}: other bytes"
    );
    r.body
}

#[test]
fn a_flipped_byte_is_caught_when_served_and_by_the_scrub() {
    let registry = Registry::start();
    let img = push_random_image_to(&registry.addr, "app:v1", &[2 * MIB, 100 * KIB, 300 * KIB]);
    let up = registry.addr.clone();
    let d = daemon(&[&up], "");
    let (big, small, scrubbed) = (&img.layers[0].0, &img.layers[1].0, &img.layers[2].0);
    for b in [big, small, scrubbed, &img.config] {
        get_ok(&d, "app", b, &up, "first pull");
    }
    assert_eq!(get_manifest(&d, "app", &img.digest, &up).status, 200);
    verify_store(&d.state_dir).expect("a sound store to start from");
    let gets = |digest: &str| registry.blob_gets().get(digest).copied().unwrap_or(0);
    let mismatches = || d.metric("imagestream_digest_mismatches_total");
    assert_eq!(mismatches(), 0.0);

    // A multi-chunk blob (2 MiB, read 512 KiB at a time) and a one-chunk blob (100 KiB).
    let mut served = Vec::new();
    for (n, (digest, at)) in [(big, MIB as u64 + 7), (small, 10)].into_iter().enumerate() {
        flip_byte(&blob_path(&d.state_dir, digest), at);
        let t = Instant::now();
        let r = mirror_get_blob(&d, "app", digest, &up, T);
        let took = t.elapsed();
        match &r {
            Err(e) => served.push(format!("{digest}: {e} after {took:?}")),
            Ok(r) => panic!(
                "a corrupt cached blob was served whole (status {}, {} bytes, hashing to {})",
                r.status,
                r.body.len(),
                sha256_bytes(&r.body)
            ),
        }
        assert_eq!(mismatches(), (n + 1) as f64, "{}", d.log_tail());
        assert!(
            !blob_path(&d.state_dir, digest).exists(),
            "the corrupt blob {digest} was not evicted\n{}",
            d.log_tail()
        );
        let before = gets(digest);
        get_ok(&d, "app", digest, &up, "the request after the corrupt one");
        assert_eq!(
            gets(digest),
            before + 1,
            "{digest} was not fetched again from upstream"
        );
        assert!(
            blob_path(&d.state_dir, digest).exists(),
            "{digest} not cached again"
        );
    }
    assert!(d.log_text().contains("no longer matches its digest"));

    // A cached manifest: hashed before it is served; the sound copy is fetched instead.
    flip_byte(&blob_path(&d.state_dir, &img.digest), 5);
    let r = get_manifest(&d, "app", &img.digest, &up);
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(
        sha256_bytes(&r.body),
        img.digest,
        "a corrupt manifest was served"
    );
    assert_eq!(mismatches(), 3.0);

    // The scrub finds a corrupt blob nobody asked for.
    flip_byte(&blob_path(&d.state_dir, scrubbed), 150 * KIB as u64);
    let v = d.cli_json(&["cache", "verify"]);
    assert_eq!(
        v["evicted"],
        serde_json::json!([scrubbed]),
        "cache verify: {v}"
    );
    assert_eq!(
        v["ok"].as_u64().map(|o| o + 1),
        v["checked"].as_u64(),
        "{v}"
    );
    assert!(!blob_path(&d.state_dir, scrubbed).exists());
    assert_eq!(mismatches(), 4.0);
    get_ok(&d, "app", scrubbed, &up, "after the scrub");
    let store = verify_store(&d.state_dir).unwrap_or_else(|e| panic!("at the end: {e}"));
    eprintln!(
        "BYTE FLIP: cut short when served: {served:?}; manifest re-fetched; scrub evicted 1 of {}; \
         {} blobs at the end, all re-hash; digest_mismatches_total {}, cache_evictions_total {}",
        v["checked"],
        store.len(),
        mismatches(),
        d.metric("imagestream_cache_evictions_total")
    );
}

/// Writes zeros into `path` until the filesystem is full.
fn fill_up(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 64 * KIB];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "filling up: {e}");
                break;
            }
        }
    }
    n
}

fn assert_no_space(r: &Result<HttpResponse, String>, d: &Daemon, what: &str) {
    match r {
        Ok(r) => {
            assert_eq!(
                r.status,
                507,
                "{what}: {} {}\n{}",
                r.status,
                r.body_text(),
                d.log_tail()
            );
            assert!(
                r.body_text().contains("no space left"),
                "{what}: {}",
                r.body_text()
            );
        }
        Err(e) => panic!("{what}: {e}\n{}", d.log_tail()),
    }
}

fn set_limit(d: &mut Daemon, limit: u64) {
    d.stop();
    let path = d.config_file.clone().expect("config file");
    std::fs::write(&path, format!("cache_max_bytes = {limit}\n")).expect("write config");
    d.start_again();
}

#[test]
fn a_full_disk_during_ingest_and_gc() {
    let registry = Registry::start();
    let up = registry.addr.clone();
    let pinned = push_random_image_to(&up, "a:v1", &[MIB, 512 * KIB]);
    let mut rng = Rng::new("a_full_disk_during_ingest_and_gc");
    let unpinned: Vec<String> = (0..3)
        .map(|_| push_blob(&up, "c", &rng.bytes(MIB)))
        .collect();
    let big_bytes = rng.bytes(7 * MIB);
    let big = push_blob(&up, "b", &big_bytes);
    let small = push_blob(&up, "b", &rng.bytes(64 * KIB));

    let mut d = daemon(&[&up], &format!("cache_max_bytes = {}\n", 64 * MIB));
    d.stop();
    let disk = Tmpfs::mount(&d.state_dir, "10m");
    d.start_again();
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&["tag", "set", "team-a/app:prod", &registry.image_ref("a:v1")]);
    let deadline = Instant::now() + T;
    while !pinned
        .blobs()
        .iter()
        .all(|b| blob_path(&d.state_dir, b).exists())
    {
        assert!(
            Instant::now() < deadline,
            "prefetch of the pinned image\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for b in &unpinned {
        get_ok(&d, "c", b, &up, "unpinned blobs");
    }
    let pinned_before: Vec<(String, String)> = pinned
        .blobs()
        .into_iter()
        .map(|b| {
            let h = sha256_file(&blob_path(&d.state_dir, &b));
            (b, h)
        })
        .collect();
    let free = disk.free();

    // 1. Ingest of a blob bigger than the free space: refused before the response starts.
    let t = Instant::now();
    let r = mirror_get_blob(&d, "b", &big, &up, T);
    let took = t.elapsed();
    assert_no_space(&r, &d, "7 MiB blob on a disk with less free");
    let message = r.as_ref().map(|r| r.body_text()).unwrap_or_default();
    assert!(
        !blob_path(&d.state_dir, &big).exists(),
        "a partial blob was stored"
    );
    assert!(d.log_text().contains("no space left"), "{}", d.log_tail());
    check_restarted(&d, "after the refused ingest");

    // 2. The disk completely full: a small blob is refused too, cached blobs are served.
    let filler = d.state_dir.join("filler");
    let filled = fill_up(&filler);
    assert_no_space(
        &mirror_get_blob(&d, "b", &small, &up, T),
        &d,
        "64 KiB blob on a full disk",
    );
    for b in pinned.layer_digests().iter().chain(&unpinned) {
        let name = if unpinned.contains(b) { "c" } else { "a" };
        get_ok(&d, name, b, &up, "cached blob on a full disk");
    }
    check_restarted(&d, "full disk, before gc");

    // 3. GC on the full disk (a restart with a 2 MiB limit, still full): the unpinned blobs
    //    go, the pinned ones stay byte for byte.
    set_limit(&mut d, 2 * MIB as u64);
    let gc = d.cli_json(&["cache", "gc"]);
    let evicted: Vec<String> = gc["evicted"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut want = unpinned.clone();
    want.sort();
    let mut got = evicted.clone();
    got.sort();
    assert_eq!(got, want, "gc on a full disk: {gc}\n{}", d.log_tail());
    for (b, h) in &pinned_before {
        assert_eq!(
            &sha256_file(&blob_path(&d.state_dir, b)),
            h,
            "pinned {b} changed on a full disk"
        );
    }
    check_restarted(&d, "after gc on a full disk");

    // 4. Space freed: the blob that did not fit is pulled whole.
    std::fs::remove_file(&filler).expect("remove filler");
    set_limit(&mut d, 64 * MIB as u64);
    let body = get_ok(&d, "b", &big, &up, "after freeing space");
    assert!(body == big_bytes);
    assert!(blob_path(&d.state_dir, &big).exists());
    check_restarted(&d, "at the end");
    eprintln!(
        "FULL DISK: 10 MiB tmpfs, {free} bytes free before the 7 MiB ingest: {} in {took:?} \
         ({message}); filled with {filled} more bytes: 64 KiB ingest 507; gc on the full disk \
         evicted {} unpinned blobs, pinned blobs unchanged; after freeing space the 7 MiB blob \
         was pulled",
        r.as_ref().map_or(0, |r| r.status),
        evicted.len()
    );
    drop(disk);
}
