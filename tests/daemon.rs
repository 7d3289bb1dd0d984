//! The daemon and the CLI as an administrator meets them: embedded defaults and overrides,
//! socket modes, stale and live sockets, SIGTERM, clear errors with non-zero exits, and pinning
//! that refuses what a registry cannot prove (digest mismatch, missing digest).

mod common;

use common::daemon::{binary, cli_with_socket, Daemon};
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// No runtime is needed for admin work: the runtime endpoint is dialled lazily.
fn daemon_without_runtime(extra_insecure: &[&str]) -> Daemon {
    Daemon::start("unix:///nonexistent/containerd.sock", extra_insecure, &[])
}

#[test]
fn sockets_are_private_stale_ones_replaced_live_ones_refused_and_sigterm_exits_zero() {
    let mut d = daemon_without_runtime(&[]);
    for s in [&d.cri_socket, &d.admin_socket] {
        let mode = std::fs::metadata(s).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", s.display());
    }
    let state_mode = std::fs::metadata(&d.state_dir)
        .expect("state dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(state_mode, 0o700);

    // A second daemon on the same sockets is refused, naming the socket.
    let out = Command::new(binary())
        .args(["serve", "--state-dir"])
        .arg(d.dir.path().join("state2"))
        .arg("--cri-socket")
        .arg(&d.cri_socket)
        .arg("--admin-socket")
        .arg(d.dir.path().join("other-admin.sock"))
        .output()
        .expect("second daemon");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("served by another live process"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&d.cri_socket.display().to_string()),
        "{}",
        stderr(&out)
    );

    // SIGTERM: exit 0, sockets removed.
    let status = d.stop();
    assert!(status.success(), "exit status {status}");
    assert!(!d.cri_socket.exists() && !d.admin_socket.exists());

    // Stale socket files (a crashed run) are replaced.
    for s in [&d.cri_socket, &d.admin_socket] {
        drop(std::os::unix::net::UnixListener::bind(s).expect("stale socket"));
        assert!(s.exists());
    }
    d.start_again();
    d.cli_ok(&["stream", "ls"]);
    assert!(d.log_text().contains("replacing stale socket"));
}

#[test]
fn config_file_and_flags_override_embedded_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(binary())
        .args(["config", "-o", "json"])
        .output()
        .expect("config");
    assert!(out.status.success(), "{}", stderr(&out));
    let defaults: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(defaults["state_dir"], "/var/lib/imagestream");
    assert_eq!(defaults["cri_socket"], "/run/imagestream/imagestream.sock");
    assert_eq!(defaults["admin_socket"], "/run/imagestream/admin.sock");
    assert_eq!(
        defaults["runtime_endpoint"],
        "unix:///run/containerd/containerd.sock"
    );

    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "state_dir = \"/srv/is\"\nruntime_endpoint = \"unix:///run/crio/crio.sock\"\ninsecure_registries = [\"reg.local:5000\"]\n",
    )
    .expect("write config");
    let out = Command::new(binary())
        .args(["config", "-o", "json", "--config"])
        .arg(&file)
        .args([
            "--state-dir",
            "/flag/wins",
            "--insecure-registry",
            "other:1",
        ])
        .output()
        .expect("config");
    assert!(out.status.success(), "{}", stderr(&out));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(c["state_dir"], "/flag/wins");
    assert_eq!(c["runtime_endpoint"], "unix:///run/crio/crio.sock");
    assert_eq!(
        c["insecure_registries"],
        serde_json::json!(["reg.local:5000", "other:1"])
    );

    std::fs::write(&file, "stat_dir = \"/typo\"\n").expect("write config");
    let out = Command::new(binary())
        .arg("config")
        .arg("--config")
        .arg(&file)
        .output()
        .expect("config");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("stat_dir"), "{}", stderr(&out));
}

#[test]
fn cli_errors_are_one_line_and_non_zero() {
    let registry = Registry::start();
    push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let d = daemon_without_runtime(&[&registry.addr]);
    let long = "a".repeat(300);
    let long_stream = format!("team-a/{long}");
    let long_tag = format!("team-a/app:{long}");
    let missing_digest = format!("{}/app@sha256:{}", registry.addr, "0".repeat(64));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["stream", "create", "Team/app"], "Team"),
        (vec!["stream", "create", "team-a"], "NAMESPACE/STREAM"),
        (vec!["stream", "create", "../app"], ".."),
        (vec!["stream", "create", &long_stream], "longer than"),
        (
            vec!["stream", "get", "team-a/nope"],
            "team-a/nope not found",
        ),
        (
            vec!["tag", "set", "team-a/nope:prod", "r/x:y"],
            "team-a/nope not found",
        ),
        (vec!["tag", "history", "team-a/app:prod"], "not found"),
        (vec!["tag", "set", &long_tag, "r/x:y"], "tag"),
        (
            vec!["resolve", "imagestream.local/team-a"],
            "imagestream.local/team-a",
        ),
    ];
    d.cli_ok(&["stream", "create", "team-a/app"]);
    let mut cases = cases;
    cases.push((vec!["stream", "create", "team-a/app"], "already exists"));
    cases.push((
        vec!["tag", "history", "team-a/app:nope"],
        "\"nope\" not found in image stream team-a/app",
    ));
    cases.push((vec!["tag", "rollback", "team-a/app:nope"], "not found"));
    cases.push((
        vec!["tag", "set", "team-a/app:prod", "bad ref!"],
        "bad ref!",
    ));
    cases.push((
        vec!["tag", "set", "team-a/app:prod", &missing_digest],
        "not found",
    ));
    cases.push((
        vec![
            "tag",
            "set",
            "team-a/app:prod",
            "imagestream.local/team-a/app:x",
        ],
        "tag \"x\" not found in image stream team-a/app",
    ));
    cases.push((
        vec!["tag", "set", "team-a/app:prod", "imagestream.local/team-a"],
        "imagestream.local/team-a",
    ));
    for (args, needle) in &cases {
        let out = d.cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: {err:?}"
        );
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    }
    // Nothing was pinned by the failures.
    let s = d.cli_json(&["stream", "get", "team-a/app"]);
    assert_eq!(s["tags"], serde_json::json!([]));

    // Rollback with no earlier digest, and to a generation that is not there.
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    let out = d.cli(&["tag", "rollback", "team-a/app:prod"]);
    assert!(
        stderr(&out).contains("no earlier generation"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["tag", "rollback", "team-a/app:prod", "--to-generation", "7"]);
    assert!(stderr(&out).contains("generation 7"), "{}", stderr(&out));

    // Pinning by digest checks the registry has it and keeps the digest.
    let digest = d.cli_json(&["tag", "history", "team-a/app:prod"])["generations"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let by_digest = format!("{}/app@{digest}", registry.addr);
    let t = d.cli_json(&["tag", "set", "team-a/app:pinned", &by_digest]);
    assert_eq!(t["generations"][0]["reference"], by_digest.as_str());

    // A tag set from another stream tag pins what that tag points at now.
    let t = d.cli_json(&[
        "tag",
        "set",
        "team-a/app:copy",
        "imagestream.local/team-a/app:prod",
    ]);
    assert_eq!(t["generations"][0]["digest"], digest.as_str());
    assert_eq!(t["source"], "imagestream.local/team-a/app:prod");

    // Usage errors exit 2; no daemon is a clear message.
    let out = d.cli(&["tag", "frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cli_with_socket(&d.dir.path().join("nothing.sock"), &["stream", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the imagestream daemon"),
        "{}",
        stderr(&out)
    );
    let help = Command::new(binary())
        .args(["tag", "set", "--help"])
        .output()
        .expect("help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("SOURCE"));
}

/// A FAULT-INJECTING registry: answers every manifest request with bytes that do not hash to
/// the digest it claims (a real registry cannot be made to do this).
fn corrupting_registry() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
            let claimed = format!("sha256:{}", "ab".repeat(32));
            let resp = if request_line.contains("/manifests/") {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nDocker-Content-Digest: {claimed}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            } else {
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string()
            };
            let mut s = stream;
            let _ = s.write_all(resp.as_bytes());
            if request_line.contains("/manifests/") && request_line.starts_with("GET") {
                let _ = s.write_all(body);
            }
            let _ = s.flush();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        }
    });
    addr
}

#[test]
fn a_manifest_that_does_not_match_its_digest_is_never_pinned() {
    let bad = corrupting_registry();
    let d = daemon_without_runtime(&[&bad]);
    d.cli_ok(&["stream", "create", "team-a/app"]);
    let out = d.cli(&["tag", "set", "team-a/app:prod", &format!("{bad}/app:v1")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.to_lowercase().contains("digest"), "{err}");
    let s = d.cli_json(&["stream", "get", "team-a/app"]);
    assert_eq!(
        s["tags"],
        serde_json::json!([]),
        "a mismatching manifest was pinned"
    );
}

#[test]
fn kill_9_during_tag_updates_leaves_a_consistent_history() {
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let mut d = daemon_without_runtime(&[&registry.addr]);
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    let mut last_generation = 1;
    for round in 0..6u64 {
        let socket = d.admin_socket.clone();
        let refs = [registry.image_ref("app:v2"), registry.image_ref("app:v1")];
        let writer = std::thread::spawn(move || {
            for i in 0..200 {
                let source = refs[i % 2].as_str();
                let args: Vec<&str> = if i % 5 == 4 {
                    vec!["tag", "rollback", "team-a/app:prod"]
                } else {
                    vec!["tag", "set", "team-a/app:prod", source]
                };
                if !cli_with_socket(&socket, &args).status.success() {
                    break;
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(150 + round * 41));
        common::daemon::signal(d.pid().expect("pid"), "KILL");
        d.stop_after_signal();
        writer.join().expect("writer thread");
        d.start_again();

        let history = d.cli_json(&["tag", "history", "team-a/app:prod"]);
        let gens = history["generations"].as_array().expect("generations");
        assert!(
            !gens.is_empty() && gens.len() <= 20,
            "history length {}",
            gens.len()
        );
        let numbers = common::daemon::dense_generations(gens, "after kill -9");
        assert!(
            numbers[0] >= last_generation,
            "history went backwards: {} < {last_generation}",
            numbers[0]
        );
        last_generation = numbers[0];
        for g in gens {
            let digest = g["digest"].as_str().expect("digest");
            assert!(digest == v1 || digest == v2, "unknown digest {digest}");
            assert_eq!(g["reference"], format!("{}/app@{digest}", registry.addr));
        }
    }
    assert!(last_generation > 1, "no update happened before the kills");
}
