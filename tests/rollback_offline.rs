//! Rollback when the registry is gone: a tag's earlier digests stay pinned in the node cache,
//! so after the old manifest is deleted upstream and the registry is stopped, `tag rollback`
//! and a pod naming the stream tag still work, served from the node's own cache through the
//! mirror (real containerd pulling through `hosts.toml`, real docker-registry with deletes).

mod common;

use common::daemon::Daemon;
use common::*;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CreateContainerRequest, ExecSyncRequest, PullImageRequest, RemoveImageRequest,
    StartContainerRequest,
};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Pulls `image` for a pod in `namespace` through imagestream, runs it and returns its
/// `/version`.
async fn run_version(
    d: &Daemon,
    rt: &mut RuntimeServiceClient<Channel>,
    pod_name: &str,
    image: &str,
) -> Result<String, String> {
    let logs = d.dir.path().join("pod-logs").join(pod_name);
    let pod = pod_config(pod_name, "team-a", &logs);
    let mut img = image_client(&d.cri_socket).await;
    img.pull_image(PullImageRequest {
        image: Some(image_spec(image)),
        auth: None,
        sandbox_config: Some(pod.clone()),
    })
    .await
    .map_err(|e| format!("PullImage {image}: {e}"))?;
    let pod_id = run_pod(rt, &pod).await;
    let cfg = container_config_with_command("app", image, &["/bin/sleep", "infinity"]);
    let ctr = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(cfg),
            sandbox_config: Some(pod),
        })
        .await
        .map_err(|e| format!("CreateContainer: {e}"))?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: ctr.clone(),
    })
    .await
    .map_err(|e| format!("StartContainer: {e}"))?;
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: ctr,
            cmd: vec!["cat".into(), "/version".into()],
            timeout: 10,
        })
        .await
        .map_err(|e| format!("ExecSync: {e}"))?
        .into_inner();
    remove_pod(rt, &pod_id).await;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until the node holds `generation` of the tag completely (prefetch runs in the
/// background).
fn wait_held(d: &Daemon, tag: &str, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = d.cli_json(&["tag", "history", tag]);
        let held = h["generations"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["generation"] == generation))
            .map(|g| g["held"] == true)
            .unwrap_or(false);
        if held {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "generation {generation} never held: {h}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_runs_from_the_node_cache_when_the_registry_is_gone() {
    require_root("the offline rollback test");
    let mut registry = Registry::start();
    push_pause_image(&registry);
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let _v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let mut ctd = RuntimeBed::start(&registry);
    // A small cache limit: eviction pressure must not touch the pinned history.
    let mut d = Daemon::start_with_config(
        &ctd.endpoint(),
        &[&registry.addr],
        &[],
        "cache_max_bytes = 1\npin_history = 3\n",
    );
    d.cli_ok(&[
        "mirror",
        "hosts-toml",
        "--registry",
        &registry.addr,
        "--dir",
        &ctd.dir.join("certs.d").display().to_string(),
        "--mirror",
        &format!("http://{}", d.mirror_addr),
    ]);
    let mut rt = runtime_client(&d.cri_socket).await;

    d.cli_ok(&["stream", "create", "team-a/app", "--lookup-local"]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    wait_held(&d, "team-a/app:prod", 1);
    assert_eq!(
        run_version(&d, &mut rt, "p1", "app:prod").await.as_deref(),
        Ok("v1")
    );
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    wait_held(&d, "team-a/app:prod", 2);
    assert_eq!(
        run_version(&d, &mut rt, "p2", "app:prod").await.as_deref(),
        Ok("v2")
    );

    // Under pressure (limit 1 byte, unrelated pulls through the mirror), gc keeps both
    // generations: they are pinned.
    for i in 0..3 {
        let other = push_random_image_to(&registry.addr, &format!("other{i}:v1"), &[256 << 10]);
        let mut direct = image_client(&ctd.socket).await;
        direct
            .pull_image(PullImageRequest {
                image: Some(image_spec(&format!(
                    "{}/other{i}@{}",
                    registry.addr, other.digest
                ))),
                auth: None,
                sandbox_config: None,
            })
            .await
            .expect("unrelated pull through the mirror");
    }
    let gc = d.cli_json(&["cache", "gc"]);
    let ls = d.cli_json(&["cache", "ls"]);
    let pinned_by: Vec<String> = ls
        .as_array()
        .expect("cache ls array")
        .iter()
        .flat_map(|b| b["pinned_by"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    assert!(pinned_by.iter().any(|p| p == "team-a/app:prod"), "{ls}");
    assert!(
        pinned_by
            .iter()
            .any(|p| p.starts_with("team-a/app:prod@generation 1")),
        "the previous generation must be pinned: {ls}\ngc: {gc}"
    );
    // A pinned blob cannot be removed by hand; the message names the tag.
    let pinned_digest = ls
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|b| b["pinned_by"].as_array().is_some_and(|p| !p.is_empty()))
        })
        .and_then(|b| b["digest"].as_str())
        .expect("a pinned blob")
        .to_string();
    let out = d.cli(&["cache", "rm", &pinned_digest]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("team-a/app:prod"),
        "{err}"
    );

    // v1 disappears upstream, then the whole registry does.
    let (status, _) = http_request(
        &registry.addr,
        "DELETE",
        &format!("/v2/app/manifests/{v1}"),
        &[],
    )
    .expect("registry answers DELETE");
    assert_eq!(status, 202, "deleting v1's manifest");
    registry.stop();

    let out = d.cli(&["tag", "rollback", "team-a/app:prod"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rollback with the registry down: {err}"
    );
    assert!(!err.contains("warning"), "the node holds v1: {err}");

    // containerd forgets v1; the pod still starts it, from the node cache.
    let mut img = image_client(&ctd.socket).await;
    img.remove_image(RemoveImageRequest {
        image: Some(image_spec(&format!("{}/app@{v1}", registry.addr))),
    })
    .await
    .expect("RemoveImage v1");
    let version = run_version(&d, &mut rt, "p3", "app:prod").await;
    assert_eq!(version.as_deref(), Ok("v1"), "{}", d.log_text());
    let metrics = http_request(&d.mirror_addr, "GET", "/metrics", &[])
        .expect("metrics")
        .1;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("imagestream_cache_hits_total") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Restart both with the registry still down; containerd forgets v1 again.
    drop(rt);
    drop(img);
    d.stop();
    ctd.stop();
    ctd.start_again();
    d.start_again();
    let mut img = image_client(&ctd.socket).await;
    img.remove_image(RemoveImageRequest {
        image: Some(image_spec(&format!("{}/app@{v1}", registry.addr))),
    })
    .await
    .expect("RemoveImage v1 after restart");
    let mut rt = runtime_client(&d.cri_socket).await;
    let version = run_version(&d, &mut rt, "p4", "app:prod").await;
    assert_eq!(
        version.as_deref(),
        Ok("v1"),
        "after restart: {}",
        d.log_text()
    );
}

#[test]
fn rollback_to_an_image_the_node_does_not_hold_warns() {
    require_root("the rollback warning test");
    let registry = Registry::start();
    push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        "prefetch = false\n",
    );
    d.cli_ok(&["stream", "create", "team-a/app"]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    let out = d.cli(&["tag", "rollback", "team-a/app:prod"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("cannot start it"),
        "{err}"
    );
    let h = d.cli_json(&["tag", "history", "team-a/app:prod"]);
    assert_eq!(h["generations"][0]["held"], false, "{h}");
    // tag import: the source (v2's tag) still points at v2, which is not current: it moves.
    let out = d.cli_ok(&["tag", "import", "team-a/app:prod"]);
    assert!(out.contains("import"), "{out}");
    let out = d.cli_ok(&["tag", "import", "team-a/app:prod"]);
    assert!(out.contains("unchanged"), "{out}");
}
