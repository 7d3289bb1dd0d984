//! Tag change events: `imagestream watch -o json` sees every set, move, rollback and delete of
//! a tag, once each, with the old and new digest, and only for the streams it asked for.

mod common;

use common::daemon::{spawn_watch, Daemon};
use common::*;
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn watch_sees_every_tag_change_once() {
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        "prefetch = false\n",
    );
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&["stream", "create", "team-b/other"]);

    let (mut watcher, rx) = spawn_watch(&d, "team-a/app");
    // The watch is live once a change made now is seen: retry the first set until it is.
    let first = loop {
        d.cli_ok(&[
            "tag",
            "set",
            "team-a/app:prod",
            &registry.image_ref("app:v1"),
        ]);
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(500)) {
            break e;
        }
        d.cli_ok(&["tag", "rm", "team-a/app:prod"]);
        let _ = rx.recv_timeout(Duration::from_millis(500)); // its delete event, if seen
    };
    assert_eq!(first["tag"], "prod", "{first}");
    assert_eq!(first["new_digest"], v1.as_str(), "{first}");
    assert_eq!(first["cause"], "set");

    d.cli_ok(&[
        "tag",
        "set",
        "team-b/other:prod",
        &registry.image_ref("app:v1"),
    ]); // filtered out
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    d.cli_ok(&["tag", "rollback", "team-a/app:prod"]);
    d.cli_ok(&["tag", "rm", "team-a/app:prod"]);
    let events: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            rx.recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("event {i} missing\n{}", d.log_text()))
        })
        .collect();
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "no further events"
    );

    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
            (s("old_digest"), s("new_digest"), s("cause"))
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (v1.clone(), v2.clone(), "set".into()),
            (v2.clone(), v2.clone(), "set".into()),
            (v2.clone(), v1.clone(), "rollback to generation 1".into()),
            (v1.clone(), "-".into(), "delete".into()),
        ],
        "{events:?}"
    );
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
}

#[test]
fn triggers_run_a_command_with_the_event_and_count_failures() {
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("events.jsonl");
    // A webhook receiver: one POST, its body handed back.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind webhook");
    let hook = listener.local_addr().expect("addr");
    let (hook_tx, hook_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break String::new();
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        break format!("{}\n{body}", head.lines().next().unwrap_or(""));
                    }
                }
            };
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            let _ = hook_tx.send(body);
        }
    });
    let config = format!(
        "prefetch = false\n\
         [[triggers]]\nname = \"record\"\nstreams = \"team-a/*\"\ncommand = [\"/bin/sh\", \"-c\", \"cat >> {}\"]\n\
         [[triggers]]\nname = \"broken\"\nstreams = \"team-a/app\"\ncommand = [\"/bin/false\"]\n\
         [[triggers]]\nname = \"webhook\"\nstreams = \"team-a/*\"\nurl = \"http://{hook}/hook\"\n",
        out.display()
    );
    let d = Daemon::start_with_config("unix:///nonexistent.sock", &[&registry.addr], &[], &config);
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&["stream", "create", "team-b/app"]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-b/app:prod",
        &registry.image_ref("app:v1"),
    ]); // not matched
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let line = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(l) = text.lines().next() {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "trigger never ran\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let e: serde_json::Value = serde_json::from_str(&line).expect("the event as JSON on stdin");
    assert_eq!(e["namespace"], "team-a");
    assert_eq!(e["tag"], "prod");
    assert_eq!(e["new_digest"], v1.as_str());
    // The failing trigger is retried, then given up on, and counted.
    let failed = "imagestream_trigger_runs_total{trigger=\"broken\",outcome=\"failed\"} 1";
    loop {
        let m = d.cli_ok(&["metrics"]);
        if m.contains(failed) {
            assert!(m.contains("trigger=\"broken\",outcome=\"retry\"} 2"), "{m}");
            assert!(m.contains("trigger=\"record\",outcome=\"ok\"} 1"), "{m}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{m}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(text.lines().count(), 1, "only team-a events: {text}");
    let posted = hook_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook received the event");
    assert!(posted.starts_with("POST /hook"), "{posted}");
    assert!(
        posted.contains(&format!("\"new_digest\":\"{v1}\"")),
        "{posted}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prepull_puts_a_moved_tag_into_the_runtime_before_any_pod_asks() {
    use k8s_cri::v1::ImageStatusRequest;
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let d = Daemon::start_with_config(
        &ctd.endpoint(),
        &[&registry.addr],
        &[],
        "prefetch = false\nprepull = true\n",
    );
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    let pinned = format!("{}/app@{v1}", registry.addr);
    let mut direct = image_client(&ctd.socket).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = direct
            .image_status(ImageStatusRequest {
                image: Some(image_spec(&pinned)),
                verbose: false,
            })
            .await
            .expect("ImageStatus")
            .into_inner();
        if status.image.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never pre-pulled\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = d.cli_ok(&["metrics"]);
    assert!(m.contains("trigger=\"prepull\",outcome=\"ok\"} 1"), "{m}");
}
