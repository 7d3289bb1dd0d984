//! Smoke test for the shared harness in `tests/common`: a real registry + containerd, driven
//! directly over CRI. Two identical tests run in parallel to prove the beds are isolated.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_cri::v1::{
    ContainerState, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest,
    ImageStatusRequest, PullImageRequest, RemoveContainerRequest, RemoveImageRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest, VersionRequest,
};

async fn full_cycle(tag: &str) {
    let t0 = Instant::now();
    let lap = |what: &str| eprintln!("[{tag}] {what}: {:?}", t0.elapsed());

    let mut registry = Registry::start();
    lap("registry up");
    push_pause_image(&registry);
    let digest = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "digest {digest}"
    );
    lap("images pushed");

    // Registry restart keeps port and storage.
    let addr = registry.addr.clone();
    registry.stop();
    assert!(!registry.is_running());
    assert_eq!(
        http_get_status(&addr, "/v2/"),
        None,
        "stopped registry still answers"
    );
    registry.restart();
    assert_eq!(registry.addr, addr);
    let (status, manifest) = http_request(
        &addr,
        "GET",
        "/v2/app/manifests/v1",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .expect("manifest GET after registry restart");
    assert_eq!(
        status,
        200,
        "manifest after restart: {}",
        String::from_utf8_lossy(&manifest)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest is JSON");
    assert_eq!(
        manifest["layers"].as_array().map(|l| l.len()),
        Some(2),
        "busybox + /version layers"
    );
    lap("registry restarted");

    let mut ctd = RuntimeBed::start(&registry);
    lap("containerd up");
    assert!(ctd.endpoint().starts_with("unix:///"));
    assert!(wait_for_socket(&ctd.socket, Duration::from_secs(1)));

    let mut rt = runtime_client(&ctd.socket).await;
    let mut img = image_client(&ctd.socket).await;

    let version = rt
        .version(VersionRequest::default())
        .await
        .expect("CRI Version")
        .into_inner();
    assert_eq!(version.runtime_name, "containerd");

    // Pull and inspect.
    let app_ref = registry.image_ref("app:v1");
    let pulled = img
        .pull_image(PullImageRequest {
            image: Some(image_spec(&app_ref)),
            ..Default::default()
        })
        .await
        .expect("PullImage app:v1")
        .into_inner();
    assert!(
        pulled.image_ref.starts_with("sha256:"),
        "image_ref {}",
        pulled.image_ref
    );
    let status = img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&app_ref)),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    let image = status.image.expect("ImageStatus shows the pulled image");
    assert_eq!(image.id, pulled.image_ref);
    assert!(
        image.repo_tags.contains(&app_ref),
        "repo_tags {:?}",
        image.repo_tags
    );
    assert!(
        image.repo_digests.iter().any(|d| d.ends_with(&digest)),
        "repo_digests {:?} should contain {digest}",
        image.repo_digests
    );
    lap("image pulled");

    // Pod + container.
    let pod_cfg = pod_config("smoke", "default", &ctd.dir.join("pod-logs"));
    let pod_id = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    lap("pod running");
    let ctr_cfg = container_config_with_command("app", &app_ref, &["/bin/sleep", "infinity"]);
    let ctr_id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(ctr_cfg),
            sandbox_config: Some(pod_cfg),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: ctr_id.clone(),
    })
    .await
    .expect("StartContainer");
    lap("container started");

    let exec = rt
        .exec_sync(ExecSyncRequest {
            container_id: ctr_id.clone(),
            cmd: vec!["cat".into(), "/version".into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync cat /version")
        .into_inner();
    assert_eq!(
        exec.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&exec.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "v1\n");

    let cstatus = rt
        .container_status(ContainerStatusRequest {
            container_id: ctr_id.clone(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("container status present");
    assert_eq!(cstatus.state, ContainerState::ContainerRunning as i32);
    lap("exec + status");

    // containerd restart keeps running containers and answers again.
    ctd.stop();
    assert!(!ctd.is_running());
    ctd.start_again();
    let mut rt = runtime_client(&ctd.socket).await;
    let mut img = image_client(&ctd.socket).await;
    rt.version(VersionRequest::default())
        .await
        .expect("Version after start_again");
    let cstatus = rt
        .container_status(ContainerStatusRequest {
            container_id: ctr_id.clone(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus after restart")
        .into_inner()
        .status
        .expect("container status present after restart");
    assert_eq!(cstatus.state, ContainerState::ContainerRunning as i32);
    lap("containerd restarted");

    rt.stop_container(StopContainerRequest {
        container_id: ctr_id.clone(),
        timeout: 2,
    })
    .await
    .expect("StopContainer");
    rt.remove_container(RemoveContainerRequest {
        container_id: ctr_id.clone(),
    })
    .await
    .expect("RemoveContainer");
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await
    .expect("RemovePodSandbox");
    img.remove_image(RemoveImageRequest {
        image: Some(image_spec(&app_ref)),
    })
    .await
    .expect("RemoveImage");
    let gone = img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&app_ref)),
            verbose: false,
        })
        .await
        .expect("ImageStatus after remove")
        .into_inner();
    assert!(
        gone.image.is_none(),
        "image still present after RemoveImage"
    );
    lap("cleaned up via CRI");

    // Leave a second pod running so that Drop has real work (shims, mounts) to clean up.
    let pod2 = pod_config("leftover", "default", &ctd.dir.join("pod-logs2"));
    rt.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(pod2),
        runtime_handler: String::new(),
    })
    .await
    .expect("RunPodSandbox leftover");
    assert!(!processes_mentioning(&ctd.dir).is_empty());
    drop(rt);
    drop(img);

    let ctd_dir = ctd.dir.clone();
    let reg_dir = registry.dir.clone();
    drop(ctd);
    drop(registry);
    lap("dropped");

    assert!(
        !ctd_dir.exists(),
        "containerd dir {} left behind",
        ctd_dir.display()
    );
    assert!(
        !reg_dir.exists(),
        "registry dir {} left behind",
        reg_dir.display()
    );
    let procs = processes_mentioning(&ctd_dir);
    assert!(
        procs.is_empty(),
        "processes still mention {}: {procs:?}",
        ctd_dir.display()
    );
    let procs = processes_mentioning(&reg_dir);
    assert!(
        procs.is_empty(),
        "processes still mention {}: {procs:?}",
        reg_dir.display()
    );
    assert!(
        mounts_under(&ctd_dir).is_empty(),
        "mounts left under {}",
        ctd_dir.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke_a() {
    full_cycle("a").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke_b() {
    full_cycle("b").await;
}

/// A test that panics with a running pod still tears its beds down while unwinding.
#[tokio::test(flavor = "multi_thread")]
async fn teardown_on_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(async move {
        let registry = Registry::start();
        let ctd = RuntimeBed::start(&registry);
        tx.send((ctd.dir.clone(), registry.dir.clone()))
            .expect("send dirs");
        let mut rt = runtime_client(&ctd.socket).await;
        let pod = pod_config("doomed", "default", &ctd.dir.join("pod-logs"));
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox");
        assert!(
            !mounts_under(&ctd.dir).is_empty(),
            "a running pod should have mounts"
        );
        panic!("deliberate panic with a running pod");
    });
    let err = task.await.expect_err("task should panic");
    assert!(err.is_panic());
    let (ctd_dir, reg_dir) = rx.recv().expect("dirs from the task");
    assert!(
        !ctd_dir.exists(),
        "containerd dir {} left behind",
        ctd_dir.display()
    );
    assert!(
        !reg_dir.exists(),
        "registry dir {} left behind",
        reg_dir.display()
    );
    assert!(processes_mentioning(&ctd_dir).is_empty());
    assert!(mounts_under(&ctd_dir).is_empty());
}
