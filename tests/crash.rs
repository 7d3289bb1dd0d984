//! Issue 8, §3: kill -9 of the real daemon during ingest, commit, tag update and GC, many times
//! over (`IMAGESTREAM_CRASH_ITERATIONS`, default 100, per phase; `IMAGESTREAM_CRASH_SEED` repeats
//! a run's random delays). After every kill the daemon is restarted on the same state dir and:
//! no temporary survives the restart (`ingest/`, `*.tmp.*`), every file under `blobs/sha256`
//! re-hashes to its name, the tag history is readable with dense generations, pinned blobs are
//! all there, and the daemon starts and serves. Each test prints its figures.
//!
//! Needs root and the harness's Debian packages (docker-registry, skopeo, umoci).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::crash::*;
use common::daemon::{binary, Daemon};
use common::mirror::*;
use common::origin::{FaultInjectingOrigin, FaultMode};
use common::*;

/// A daemon with no container runtime behind it: the mirror, the cache and the admin API are
/// all these tests need.
fn daemon(insecure: &[&str], config: Option<&str>) -> Daemon {
    let runtime = "unix:///nonexistent/containerd.sock";
    match config {
        Some(c) => Daemon::start_with_config(runtime, insecure, &[], c),
        None => Daemon::start(runtime, insecure, &[]),
    }
}

fn remove_blob_files(state_dir: &Path, digests: &[String]) {
    for d in digests {
        let _ = std::fs::remove_file(blob_path(state_dir, d));
    }
}

/// Temporaries under `ingest/` right after a kill, with their sizes.
fn ingest_files(state_dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    files_under(&ingest_dir(state_dir))
}

/// Polls (1 ms) until `cond` holds or `timeout` passes; whether it held.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

struct Figures {
    phase: &'static str,
    iterations: usize,
    started: Instant,
    restarts: Duration,
    rehashed: usize,
    temporaries_at_kill: usize,
    notes: BTreeMap<&'static str, usize>,
}

impl Figures {
    fn new(phase: &'static str) -> Figures {
        Figures {
            phase,
            iterations: 0,
            started: Instant::now(),
            restarts: Duration::ZERO,
            rehashed: 0,
            temporaries_at_kill: 0,
            notes: BTreeMap::new(),
        }
    }

    fn restart(&mut self, d: &mut Daemon, when: &str) {
        let t = Instant::now();
        d.start_again();
        self.restarts += t.elapsed();
        self.rehashed += check_restarted(d, when);
        self.iterations += 1;
    }

    fn note(&mut self, what: &'static str) {
        *self.notes.entry(what).or_default() += 1;
    }

    fn print(&self) {
        let total = self.started.elapsed();
        eprintln!(
            "CRASH {}: {} kill -9 survived in {:.1} s ({:.0} ms per round, restart {:.0} ms \
             mean); blobs re-hashed {} (all matched); temporaries found at kill time {} and \
             after restart 0; {:?}",
            self.phase,
            self.iterations,
            total.as_secs_f64(),
            total.as_secs_f64() * 1000.0 / self.iterations.max(1) as f64,
            self.restarts.as_secs_f64() * 1000.0 / self.iterations.max(1) as f64,
            self.rehashed,
            self.temporaries_at_kill,
            self.notes
        );
    }
}

/// kill -9 while blobs stream in through the mirror (a throttled origin keeps each ingest
/// running for about 250 ms): no partial blob, the temporaries are gone after the restart, and
/// the blobs can be pulled afterwards.
#[test]
fn kill_9_during_ingest() {
    let mut rng = Rng::new("kill_9_during_ingest");
    let registry = Registry::start();
    let blobs: Vec<(String, Vec<u8>)> = (0..4)
        .map(|_| {
            let bytes = rng.bytes(2 * MIB);
            (push_blob(&registry.addr, "big", &bytes), bytes)
        })
        .collect();
    let digests: Vec<String> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let origin =
        FaultInjectingOrigin::start(&registry.addr, FaultMode::ThrottleBlobs(8 * MIB as u64));
    let mut d = daemon(&[&origin.addr], None);
    let mut f = Figures::new("ingest");
    for i in 0..iterations() {
        let digest = digests[i % digests.len()].clone();
        let (addr, up) = (d.mirror_addr.clone(), origin.addr.clone());
        let client = std::thread::spawn(move || {
            http_fetch(
                &addr,
                "GET",
                &format!("/v2/big/blobs/{digest}?ns={up}"),
                &[],
                &[],
                Duration::from_secs(30),
            )
        });
        // Each ingest takes about 250 ms: kill at a random point of it.
        let ingest = ingest_dir(&d.state_dir);
        wait_until(Duration::from_secs(10), || !files_under(&ingest).is_empty());
        std::thread::sleep(Duration::from_millis(rng.range(0, 250)));
        d.kill9();
        let at_kill = ingest_files(&d.state_dir);
        f.temporaries_at_kill += at_kill.len();
        if at_kill.is_empty() {
            f.note("killed with no ingest in flight");
        } else {
            f.note("killed mid-ingest");
        }
        match client.join().expect("client thread") {
            Ok(r) if r.status == 200 => f.note("client got the whole blob"),
            _ => f.note("client saw the cut"),
        }
        f.restart(&mut d, &format!("ingest round {i}"));
        // Gone from the cache: the next round ingests again (the index forgets a missing file).
        remove_blob_files(&d.state_dir, &digests);
    }
    origin.set_mode(FaultMode::PassThrough);
    for (digest, bytes) in &blobs {
        let r = mirror_get_blob(&d, "big", digest, &origin.addr, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("GET {digest} after the kills: {e}\n{}", d.log_tail()));
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert!(r.body == *bytes, "GET {digest}: other bytes");
    }
    let store = check_restarted(&d, "after the kills");
    assert_eq!(store, blobs.len(), "blobs after the final pulls");
    f.print();
    assert!(
        f.notes.get("killed mid-ingest").copied().unwrap_or(0) >= f.iterations / 2,
        "most kills should land mid-ingest: {:?}",
        f.notes
    );
}

/// kill -9 while many small blobs are committed at once (no throttling: each ingest is a few
/// ms, most of it fsync, size and digest check, rename, directory fsync): a blob is there
/// whole or not at all.
#[test]
fn kill_9_during_commit() {
    let mut rng = Rng::new("kill_9_during_commit");
    let registry = Registry::start();
    let blobs: Vec<(String, usize)> = (0..24)
        .map(|i| {
            let size = 64 * KIB + i * 4 * KIB;
            (push_blob(&registry.addr, "small", &rng.bytes(size)), size)
        })
        .collect();
    let digests: Vec<String> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let sizes: BTreeMap<u64, ()> = blobs.iter().map(|(_, s)| (*s as u64, ())).collect();
    let mut d = daemon(&[&registry.addr], None);
    let mut f = Figures::new("commit");
    let mut committed_at_kill = 0usize;
    for i in 0..iterations() {
        let mut clients = Vec::new();
        for chunk in digests.chunks(3) {
            let chunk = chunk.to_vec();
            let (addr, up) = (d.mirror_addr.clone(), registry.addr.clone());
            clients.push(std::thread::spawn(move || {
                for digest in chunk {
                    let _ = http_fetch(
                        &addr,
                        "GET",
                        &format!("/v2/small/blobs/{digest}?ns={up}"),
                        &[],
                        &[],
                        Duration::from_secs(30),
                    );
                }
            }));
        }
        // Kill once commits have begun (the first blob is in place), at a random point after.
        let blob_dir = blobs_dir(&d.state_dir);
        wait_until(Duration::from_secs(10), || {
            std::fs::read_dir(&blob_dir).is_ok_and(|mut r| r.next().is_some())
        });
        std::thread::sleep(Duration::from_millis(rng.range(0, 30)));
        d.kill9();
        let at_kill = ingest_files(&d.state_dir);
        f.temporaries_at_kill += at_kill.len();
        // A temporary holding all of a blob's bytes was killed inside commit (fsync, checks,
        // rename) or just before it.
        let complete = at_kill
            .iter()
            .filter(|(_, s)| sizes.contains_key(s))
            .count();
        let stored = store_blobs(&d.state_dir)
            .unwrap_or_else(|e| panic!("round {i}, right after kill: {e}"))
            .len();
        committed_at_kill += stored;
        if complete > 0 {
            f.note("killed with a complete temporary (in commit)");
        }
        if stored > 0 && stored < digests.len() {
            f.note("killed between commits (some blobs stored, some not)");
        }
        for c in clients {
            c.join().expect("client thread");
        }
        f.restart(&mut d, &format!("commit round {i}"));
        remove_blob_files(&d.state_dir, &digests);
    }
    for (digest, _) in &blobs {
        let r = mirror_get_blob(&d, "small", digest, &registry.addr, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("GET {digest} after the kills: {e}\n{}", d.log_tail()));
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert_eq!(sha256_bytes(&r.body), *digest);
    }
    check_restarted(&d, "after the kills");
    eprintln!(
        "commit: blobs already committed at kill time, summed over rounds: {committed_at_kill}"
    );
    f.print();
    assert!(
        f.notes
            .get("killed between commits (some blobs stored, some not)")
            .copied()
            .unwrap_or(0)
            > 0,
        "no kill landed between commits: {:?}",
        f.notes
    );
}

/// kill -9 while `tag set` and `tag rollback` run back to back (each a store write, and each
/// starting a prefetch into the cache): the history stays readable, generations dense and never
/// going backwards, every record names one of the two images.
#[test]
fn kill_9_during_tag_updates() {
    let mut rng = Rng::new("kill_9_during_tag_updates");
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let mut d = daemon(&[&registry.addr], None);
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    let mut f = Figures::new("tag update");
    let mut last_generation = 1;
    let mut moved = 0u64;
    for i in 0..iterations() {
        let socket = d.admin_socket.clone();
        let refs = [registry.image_ref("app:v2"), registry.image_ref("app:v1")];
        let (done, written) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            for j in 0..1000 {
                let source = refs[j % 2].as_str();
                let args: Vec<&str> = if j % 5 == 4 {
                    vec!["tag", "rollback", "team-a/app:prod"]
                } else {
                    vec!["tag", "set", "team-a/app:prod", source]
                };
                if !common::daemon::cli_with_socket(&socket, &args)
                    .status
                    .success()
                {
                    break;
                }
                let _ = done.send(());
            }
        });
        // Kill once updates are flowing, at a random point of the following ones.
        let _ = written.recv_timeout(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(rng.range(0, 200)));
        d.kill9();
        f.temporaries_at_kill += temporaries(&d.state_dir).len();
        writer.join().expect("writer thread");
        f.restart(&mut d, &format!("tag round {i}"));

        let history = d.cli_json(&["tag", "history", "team-a/app:prod"]);
        let gens = history["generations"]
            .as_array()
            .unwrap_or_else(|| panic!("round {i}: history without generations: {history}"));
        assert!(
            !gens.is_empty() && gens.len() <= 20,
            "history length {}",
            gens.len()
        );
        let numbers = common::daemon::dense_generations(gens, &format!("round {i}"));
        assert!(
            numbers[0] >= last_generation,
            "round {i}: history went backwards: {} < {last_generation}",
            numbers[0]
        );
        moved += numbers[0] - last_generation;
        last_generation = numbers[0];
        for g in gens {
            let digest = g["digest"].as_str().expect("digest");
            assert!(
                digest == v1 || digest == v2,
                "round {i}: unknown digest {digest}"
            );
            assert_eq!(g["reference"], format!("{}/app@{digest}", registry.addr));
        }
        let stream = d.cli_json(&["stream", "get", "team-a/app"]);
        assert!(
            stream.to_string().contains("prod"),
            "round {i}: stream get lost the tag: {stream}"
        );
    }
    eprintln!("tag update: generations written across the kills: {moved}");
    f.print();
    assert!(moved > 0, "no update happened before the kills");
}

/// kill -9 during `cache gc`: 300 unpinned 8 KiB blobs over a 1 MiB limit, and a stream tag
/// whose image is pinned. Before each round the unpinned blobs are put back (daemon stopped,
/// files copied in under their digests). Pinned blobs are never touched, and what is left
/// re-hashes to its name.
#[test]
fn kill_9_during_gc() {
    let mut rng = Rng::new("kill_9_during_gc");
    let registry = Registry::start();
    let pinned = push_random_image_to(&registry.addr, "a:v1", &[256 * KIB, 256 * KIB]);
    let limit = MIB as u64;
    let mut d = daemon(
        &[&registry.addr],
        Some(&format!("cache_max_bytes = {limit}\n")),
    );
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&["tag", "set", "team-a/app:prod", &registry.image_ref("a:v1")]);
    let deadline = Instant::now() + Duration::from_secs(30);
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
    let golden = tempfile::tempdir().expect("golden dir");
    let unpinned: Vec<String> = (0..300)
        .map(|_| {
            let bytes = rng.bytes(8 * KIB);
            let digest = sha256_bytes(&bytes);
            std::fs::write(golden.path().join(&digest[7..]), &bytes).expect("write golden");
            digest
        })
        .collect();
    let put_back = |state_dir: &Path| {
        for digest in &unpinned {
            let to = blob_path(state_dir, digest);
            if !to.exists() {
                std::fs::copy(golden.path().join(&digest[7..]), &to).expect("copy blob in");
            }
        }
    };
    d.kill9();
    let mut f = Figures::new("gc");
    let mut evicted_at_kill = Vec::new();
    for i in 0..iterations() {
        put_back(&d.state_dir);
        f.restart(&mut d, &format!("gc round {i}"));
        let mut gc = Command::new(binary())
            .arg("--admin-socket")
            .arg(&d.admin_socket)
            .args(["cache", "gc"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cache gc");
        // Half the rounds kill at a random point from the start of `cache gc`, half at a random
        // point after its first eviction.
        if rng.next() % 2 == 0 {
            std::thread::sleep(Duration::from_millis(rng.range(0, 60)));
        } else {
            let blob_dir = blobs_dir(&d.state_dir);
            let all = pinned.blobs().len() + unpinned.len();
            wait_until(Duration::from_secs(10), || {
                std::fs::read_dir(&blob_dir).map_or(0, |r| r.count()) < all
            });
            std::thread::sleep(Duration::from_millis(rng.range(0, 10)));
        }
        d.kill9();
        let _ = gc.wait();
        f.temporaries_at_kill += temporaries(&d.state_dir).len();
        let store = store_blobs(&d.state_dir)
            .unwrap_or_else(|e| panic!("round {i}, right after kill: {e}"));
        for b in pinned.blobs() {
            assert!(
                store.contains_key(&b),
                "round {i}: pinned blob {b} was removed by gc\n{}",
                d.log_tail()
            );
        }
        let evicted = unpinned.iter().filter(|b| !store.contains_key(*b)).count();
        evicted_at_kill.push(evicted);
    }
    // A last round to completion: the cache gets within its limit with the pins intact.
    put_back(&d.state_dir);
    f.restart(&mut d, "final gc");
    let report = d.cli_json(&["cache", "gc"]);
    let store = check_restarted(&d, "after the final gc");
    let full = report["evicted"].as_array().map_or(0, |a| a.len());
    assert!(
        report["size_bytes"].as_u64().unwrap_or(u64::MAX) <= limit,
        "final gc: {report}"
    );
    for b in pinned.blobs() {
        assert!(
            blob_path(&d.state_dir, &b).exists(),
            "pinned {b} gone after the final gc"
        );
    }
    let partial = evicted_at_kill
        .iter()
        .filter(|e| **e > 0 && **e < full)
        .count();
    let before = evicted_at_kill.iter().filter(|e| **e == 0).count();
    let after = evicted_at_kill.iter().filter(|e| **e >= full).count();
    eprintln!(
        "gc: a whole gc evicts {full} blobs; kills landed before any eviction {before}, \
         mid-gc {partial}, after it finished {after}; {store} blobs left after the final gc"
    );
    f.print();
    assert!(partial > 0, "no kill landed mid-gc: {evicted_at_kill:?}");
}
