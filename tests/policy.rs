//! The node's pull policy and the admin surface: `allowed_registries` and `require_pinned`
//! through real containerd (and the dry run that logs instead of refusing); a non-root caller
//! refused for changes and allowed to read in the reader group; bad input through the admin API
//! and the CRI answered with `InvalidArgument`, nothing stored, the daemon still serving.

mod common;

use common::daemon::Daemon;
use common::*;
use k8s_cri::v1::{CreateContainerRequest, ImageSpec, PullImageRequest};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use tonic::Code;

fn config_file(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_registries_and_require_pinned_refuse_or_with_dry_run_log() {
    let registry = Registry::start();
    let digest = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("logs");
    let pinned = format!("{}/app@{digest}", registry.addr);
    let by_tag = registry.image_ref("app:v1");

    for dry_run in [false, true] {
        // Only a registry that is not ours is allowed.
        let cfg = config_file(
            cfgdir.path(),
            &format!(
                "allowed_registries = [\"registry.example.com\"]\npolicy_dry_run = {dry_run}\n"
            ),
        );
        let daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &["--config", &cfg]);
        let mut img = image_client(&daemon.cri_socket).await;
        let pod = pod_config("p", "default", logs.path());
        let r = img
            .pull_image(PullImageRequest {
                image: Some(image_spec(&pinned)),
                auth: None,
                sandbox_config: Some(pod.clone()),
            })
            .await;
        if dry_run {
            r.expect("dry run: pull goes through");
            assert!(daemon
                .log_text()
                .contains("pull would be denied (policy dry run)"));
            let metrics = daemon.cli_ok(&["metrics"]);
            assert!(
                metrics.contains(
                    "imagestream_pull_denials_total{reason=\"registry\",enforced=\"false\"} 1"
                ),
                "{metrics}"
            );
        } else {
            let err = r.expect_err("registry not allowed");
            assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
            assert!(err.message().contains(&registry.addr), "{}", err.message());
            assert!(daemon.log_text().contains("pull denied by node policy"));
        }
        drop(daemon);

        // Our registry allowed, pinning required: by-digest passes, by-tag is refused with how
        // to pin it; a stream tag (pinned by construction) passes.
        let cfg = config_file(
            cfgdir.path(),
            &format!("allowed_registries = [\"127.0.0.1:*\"]\nrequire_pinned = true\npolicy_dry_run = {dry_run}\n"),
        );
        let daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &["--config", &cfg]);
        let mut img = image_client(&daemon.cri_socket).await;
        img.pull_image(PullImageRequest {
            image: Some(image_spec(&pinned)),
            auth: None,
            sandbox_config: Some(pod.clone()),
        })
        .await
        .expect("pinned reference from an allowed registry");
        let r = img
            .pull_image(PullImageRequest {
                image: Some(image_spec(&by_tag)),
                auth: None,
                sandbox_config: Some(pod.clone()),
            })
            .await;
        if dry_run {
            r.expect("dry run: unpinned pull goes through");
        } else {
            let err = r.expect_err("unpinned");
            assert_eq!(err.code(), Code::PermissionDenied);
            assert!(
                err.message().contains("require_pinned") && err.message().contains("@sha256:"),
                "{}",
                err.message()
            );
        }
        daemon.cli_ok(&["stream", "create", "default/app"]);
        daemon.cli_ok(&["tag", "set", "default/app:prod", &by_tag]);
        img.pull_image(PullImageRequest {
            image: Some(image_spec("imagestream.local/default/app:prod")),
            auth: None,
            sandbox_config: Some(pod.clone()),
        })
        .await
        .expect("stream references are pinned");

        // CreateContainer checks what the pod named (user_specified_image), also for an image
        // already on the node.
        if !dry_run {
            let mut rt = runtime_client(&daemon.cri_socket).await;
            let pod_id = run_pod(&mut rt, &pod).await;
            let mut cfg =
                container_config_with_command("app", &pinned, &["/bin/sleep", "infinity"]);
            cfg.image = Some(ImageSpec {
                image: pinned.clone(),
                user_specified_image: by_tag.clone(),
                ..Default::default()
            });
            let err = rt
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod_id.clone(),
                    config: Some(cfg),
                    sandbox_config: Some(pod.clone()),
                })
                .await
                .expect_err("unpinned user_specified_image");
            assert_eq!(err.code(), Code::PermissionDenied);
            remove_pod(&mut rt, &pod_id).await;
        }
    }
}

/// Runs the CLI as uid/gid 4242 with the given supplementary groups.
fn cli_as_user(
    admin_socket: &std::path::Path,
    groups: &str,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "4242", "--regid", "4242"]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        cmd.args(["--groups", groups]);
    }
    cmd.arg(common::daemon::binary())
        .arg("--admin-socket")
        .arg(admin_socket)
        .args(args)
        .output()
        .expect("setpriv")
}

#[test]
fn non_root_callers_are_refused_changes_and_may_read_in_the_reader_group() {
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let cfg = config_file(
        cfgdir.path(),
        "reader_group = \"4343\"\nadmin_group = \"4444\"\n",
    );
    let d = Daemon::start(
        "unix:///nonexistent/containerd.sock",
        &[],
        &["--config", &cfg],
    );
    // Let uid 4242 reach the socket's directory (the temp dir is 0700 root).
    for dir in [
        d.dir.path().to_path_buf(),
        d.admin_socket.parent().expect("run dir").to_path_buf(),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let meta = std::fs::metadata(&d.admin_socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 4343);
    d.cli_ok(&["stream", "create", "team-a/app"]);

    // Not in any group: cannot even connect (socket mode).
    let out = cli_as_user(&d.admin_socket, "", &["stream", "ls"]);
    assert!(!out.status.success());
    // In the reader group: reads work, changes are refused naming the uid.
    let out = cli_as_user(&d.admin_socket, "4343", &["stream", "ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("team-a"));
    let out = cli_as_user(
        &d.admin_socket,
        "4343",
        &["stream", "create", "team-a/other"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uid 4242 may not"), "{err}");
    // In the admin group (and the socket's group): changes work; they are audited with the uid.
    let out = cli_as_user(
        &d.admin_socket,
        "4343,4444",
        &["stream", "create", "team-a/other"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = d.log_text();
    assert!(
        log.contains("admin call refused") && log.contains("admin change"),
        "{log}"
    );
    assert!(log.contains("uid=4242"), "{log}");
    let metrics = d.cli_ok(&["metrics"]);
    assert!(
        metrics.contains("imagestream_admin_denials_total{action=\"create stream\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_invalid_argument_and_the_daemon_keeps_serving() {
    let registry = Registry::start();
    let ctd = RuntimeBed::start(&registry);
    let d = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    d.cli_ok(&["stream", "create", "team-a/app"]);
    let huge = "a".repeat(10 << 20);
    let long = "a".repeat(300);
    let bad_digest = format!("{}/app@sha256:xyz", registry.addr);
    let upper = format!("{}/Team/App:v1", registry.addr);

    // Admin API, straight through gRPC (the CLI would refuse some of these itself).
    let mut admin = imagestream::admin::client::connect(&d.admin_socket)
        .await
        .expect("admin client");
    use imagestream::admin::pb;
    let creates = [
        ("", "app"),
        ("team-a", ""),
        (long.as_str(), "app"),
        ("team-a", long.as_str()),
        ("..", "app"),
        ("team-a", "a/b"),
        (huge.as_str(), "app"),
    ];
    for (ns, name) in creates {
        let err = admin
            .create_stream(pb::CreateStreamRequest {
                namespace: ns.into(),
                name: name.into(),
                lookup_local: false,
            })
            .await
            .expect_err("bad name");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{:?}",
            &err.message()[..err.message().len().min(200)]
        );
        assert!(err.message().len() < 2048, "error message not capped");
    }
    for (tag, source) in [
        ("prod", bad_digest.as_str()),
        ("prod", upper.as_str()),
        ("prod", huge.as_str()),
        ("..", "r/x:y"),
        (long.as_str(), "r/x:y"),
        ("", "r/x:y"),
    ] {
        let err = admin
            .set_tag(pb::SetTagRequest {
                namespace: "team-a".into(),
                name: "app".into(),
                tag: tag.into(),
                source: source.into(),
                ..Default::default()
            })
            .await
            .expect_err("bad tag or source");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{tag:.20} {source:.60}: {:.200}",
            err.message()
        );
    }
    let err = admin
        .resolve(pb::ResolveRequest {
            reference: huge.clone(),
            namespace: String::new(),
        })
        .await
        .expect_err("huge reference");
    assert_eq!(err.code(), Code::InvalidArgument);

    // CRI. (A request over the CRI socket's 4 MiB cap for decided calls is refused before it
    // is decoded, with ResourceExhausted: tests/cri_limits.rs.)
    let big = "a".repeat(1 << 20);
    let mut img = image_client(&d.cri_socket).await;
    let pod = pod_config("p", "team-a", &d.dir.path().join("logs"));
    for reference in [
        "imagestream.local/team-a".to_string(),
        "imagestream.local/../app:prod".to_string(),
        format!("imagestream.local/team-a/{long}:prod"),
        format!("imagestream.local/{big}"),
        big.clone(),
    ] {
        let err = img
            .pull_image(PullImageRequest {
                image: Some(image_spec(&reference)),
                auth: None,
                sandbox_config: Some(pod.clone()),
            })
            .await
            .expect_err("bad reference");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{:.80}: {:.200}",
            reference,
            err.message()
        );
    }

    // Nothing stored; still serving.
    let s = d.cli_json(&["stream", "ls"]);
    assert_eq!(s.as_array().map(|a| a.len()), Some(1));
    assert_eq!(s[0]["tags"], serde_json::json!([]));
    let mut rt = runtime_client(&d.cri_socket).await;
    rt.version(k8s_cri::v1::VersionRequest::default())
        .await
        .expect("still serving CRI");
}
