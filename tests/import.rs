//! Scheduled import against a real docker-registry: a tag that follows a registry tag moves
//! when a new image is pushed under it (one event, cause `import`); with the registry stopped
//! the failure is the tag's import condition and the tag keeps its digest; when the registry
//! is back the next import succeeds and the condition clears.

mod common;

use common::daemon::{spawn_watch, Daemon};
use common::*;
use std::time::Duration;

/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn a_scheduled_tag_follows_its_source_and_survives_registry_outages() {
    let mut registry = Registry::start();
    let v1 = push_image(
        &registry,
        "app",
        "stable",
        "v1",
        &["/bin/sleep", "infinity"],
    );
    let hook_dir = tempfile::tempdir().expect("tempdir");
    let hook_out = hook_dir.path().join("events.jsonl");
    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        &format!(
            "prefetch = false\nimport_min_interval_secs = 1\n\
             [[triggers]]\nname = \"record\"\nstreams = \"team-a/app\"\n\
             command = [\"/bin/sh\", \"-c\", \"cat >> {}\"]\n",
            hook_out.display()
        ),
    );
    d.cli_ok(&["stream", "create", "team-a/app"]);
    let short = d.cli(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:stable"),
        "--scheduled",
        "--interval",
        "0s",
    ]);
    assert!(!short.status.success(), "a zero interval is refused");
    assert!(String::from_utf8_lossy(&short.stderr).contains("interval"));

    // A watcher, synchronised by a change it must see.
    let (mut watcher, rx) = spawn_watch(&d, "team-a/app");
    loop {
        d.cli_ok(&[
            "tag",
            "set",
            "team-a/app:sync",
            &registry.image_ref("app:stable"),
        ]);
        if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            break;
        }
    }
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}

    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:stable"),
        "--scheduled",
        "--interval",
        "1s",
    ]);
    let set = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the set event");
    assert_eq!(set["cause"], "set");

    // A new image under the followed tag: the tag moves by itself, once.
    let v2 = push_image(
        &registry,
        "app",
        "stable",
        "v2",
        &["/bin/sleep", "infinity"],
    );
    let moved = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no import event\n{}", d.log_text()));
    assert_eq!(moved["tag"], "prod", "{moved}");
    assert_eq!(moved["old_digest"], v1.as_str());
    assert_eq!(moved["new_digest"], v2.as_str());
    assert_eq!(moved["cause"], "import");
    std::thread::sleep(Duration::from_secs(3)); // a few more checks: the same digest
    assert!(rx.try_recv().is_err(), "the same digest is not a new event");
    let hooked = std::fs::read_to_string(&hook_out).unwrap_or_default();
    let imports: Vec<&str> = hooked
        .lines()
        .filter(|l| l.contains("\"cause\":\"import\""))
        .collect();
    assert_eq!(
        imports.len(),
        1,
        "the trigger got the import event once: {hooked}"
    );
    assert!(imports[0].contains(v2.as_str()), "{hooked}");
    let h = d.cli_json(&["tag", "history", "team-a/app:prod"]);
    assert_eq!(h["generations"].as_array().map(Vec::len), Some(2), "{h}");
    assert_eq!(h["import_interval_secs"], 1);

    // The registry goes away: the condition says so, the tag keeps v2 and still resolves.
    registry.stop();
    let condition =
        |d: &Daemon| d.cli_json(&["tag", "history", "team-a/app:prod"])["import_condition"].clone();
    d.wait_for("a failing import condition", WAIT, || {
        condition(&d)["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    });
    let c = condition(&d);
    assert!(c["consecutive_failures"].as_u64().unwrap_or(0) >= 1, "{c}");
    let out = d.cli_ok(&["stream", "get", "team-a/app"]);
    assert!(out.contains("failing"), "{out}");
    let r = d.cli_json(&["resolve", "imagestream.local/team-a/app:prod"]);
    assert_eq!(r["digest"], v2.as_str(), "{r}");

    registry.restart();
    d.wait_for("the condition to clear", WAIT, || {
        condition(&d)["error"].as_str() == Some("")
    });
    let h = d.cli_json(&["tag", "history", "team-a/app:prod"]);
    assert_eq!(h["generations"][0]["digest"], v2.as_str());
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[test]
fn a_tag_following_another_stream_tag_moves_with_it_and_cycles_are_refused() {
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        "prefetch = false\n",
    );
    d.cli_ok(&["stream", "create", "team-a/base"]);
    d.cli_ok(&["stream", "create", "team-b/app"]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/base:prod",
        &registry.image_ref("app:v1"),
    ]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-b/app:canary",
        "--from-stream",
        "team-a/base:prod",
    ]);
    // A chain: team-b/app:stage follows team-b/app:canary.
    d.cli_ok(&[
        "tag",
        "set",
        "team-b/app:stage",
        "imagestream.local/team-b/app:canary",
    ]);
    let current = |tag: &str| d.cli_json(&["tag", "history", tag])["generations"][0].clone();
    assert_eq!(current("team-b/app:canary")["digest"], v1.as_str());

    d.cli_ok(&[
        "tag",
        "set",
        "team-a/base:prod",
        &registry.image_ref("app:v2"),
    ]);
    d.wait_for("canary and stage to follow base to v2", WAIT, || {
        current("team-b/app:stage")["digest"] == v2.as_str()
    });
    let c = current("team-b/app:canary");
    assert_eq!(c["digest"], v2.as_str());
    assert_eq!(c["cause"], "follows team-a/base:prod", "{c}");
    assert_eq!(
        current("team-b/app:stage")["cause"],
        "follows team-b/app:canary"
    );

    d.cli_ok(&["tag", "rollback", "team-a/base:prod"]);
    d.wait_for("canary and stage to follow the rollback", WAIT, || {
        current("team-b/app:stage")["digest"] == v1.as_str()
    });

    let out = d.cli(&[
        "tag",
        "set",
        "team-a/base:prod",
        "--from-stream",
        "team-b/app:stage",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cycle must be refused");
    assert!(
        err.contains("cycle")
            && err.contains(
                "team-a/base:prod -> team-b/app:stage -> team-b/app:canary -> team-a/base:prod"
            ),
        "{err}"
    );
    assert_eq!(current("team-a/base:prod")["digest"], v1.as_str());
}
