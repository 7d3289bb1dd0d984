//! Private images stay private on a shared node (issue 8 §1). A real docker-registry behind
//! htpasswd holds `private/app`; the node pulls through its mirror with its own credentials,
//! so after pod A's pull every blob is on the node. Pod A (the right pull secret) runs the
//! image; pod B (no secret, a wrong one) is refused at PullImage and at CreateContainer,
//! although containerd holds the image; ImageStatus hides it so the kubelet always pulls with
//! the pod's credentials. With the registry down, credentials verified before are accepted,
//! others refused with `RegistryUnavailable`; so is a runtime pull from a registry that refuses
//! connections. The password never reaches the log.

mod common;

use common::auth::{docker_config_json, HtpasswdRegistry};
use common::daemon::Daemon;
use common::*;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, CreateContainerRequest, ImageStatusRequest, PodSandboxConfig, PullImageRequest,
};
use std::time::Duration;
use tonic::transport::Channel;

const USER: &str = "team-a-puller";
const PASSWORD: &str = "pr1vate-Pa55";

fn auth(user: &str, password: &str) -> Option<AuthConfig> {
    Some(AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    })
}

async fn pull(
    img: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<AuthConfig>,
    pod: &PodSandboxConfig,
) -> Result<String, tonic::Status> {
    Ok(img
        .pull_image(PullImageRequest {
            image: Some(image_spec(image)),
            auth,
            sandbox_config: Some(pod.clone()),
        })
        .await?
        .into_inner()
        .image_ref)
}

async fn present(img: &mut ImageServiceClient<Channel>, image: &str) -> bool {
    img.image_status(ImageStatusRequest {
        image: Some(image_spec(image)),
        verbose: false,
    })
    .await
    .expect("ImageStatus")
    .into_inner()
    .image
    .is_some()
}

/// CreateContainer as the kubelet sends it: the image id, and what the pod named.
async fn create(
    rt: &mut RuntimeServiceClient<Channel>,
    pod_id: &str,
    pod: &PodSandboxConfig,
    image_id: &str,
    named: &str,
) -> Result<String, tonic::Status> {
    let mut cfg = container_config_with_command("app", image_id, &["/bin/sleep", "infinity"]);
    if let Some(spec) = cfg.image.as_mut() {
        spec.user_specified_image = named.to_string();
    }
    Ok(rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(cfg),
            sandbox_config: Some(pod.clone()),
        })
        .await?
        .into_inner()
        .container_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_image_in_the_node_cache_runs_only_for_pods_with_its_pull_secret() {
    let origin = Registry::start();
    push_image(
        &origin,
        "private/app",
        "v1",
        "v1",
        &["/bin/sleep", "infinity"],
    );
    let mut private = Some(HtpasswdRegistry::start(
        &origin.dir.join("data"),
        USER,
        PASSWORD,
    ));
    let private_addr = private.as_ref().map(|r| r.addr.clone()).unwrap_or_default();
    let ctd = RuntimeBed::start(&origin);
    let dir = tempfile::tempdir().expect("tempdir");
    let auth_file = dir.path().join("auth.json");
    std::fs::write(
        &auth_file,
        docker_config_json(&private_addr, USER, PASSWORD),
    )
    .expect("write auth.json");
    let daemon = Daemon::start_with_config(
        &ctd.endpoint(),
        &[&private_addr],
        &[],
        &format!(
            "registry_auth_file = {:?}\nprivate_images_ttl_secs = 2\n",
            auth_file.display().to_string()
        ),
    );
    daemon.route_through_mirror(&ctd, &private_addr);
    let image = format!("{private_addr}/private/app:v1");
    let mut img = image_client(&daemon.cri_socket).await;
    let mut rt = runtime_client(&daemon.cri_socket).await;
    let logs = tempfile::tempdir().expect("logs");

    // Pod A, with the right secret: pulls (through the mirror, into the node cache) and runs.
    let pod_a = pod_config("pod-a", "team-a", &logs.path().join("a"));
    assert!(!present(&mut img, &image).await);
    let id = pull(&mut img, &image, auth(USER, PASSWORD), &pod_a)
        .await
        .expect("pod A pulls with its secret");
    let pod_a_id = run_pod(&mut rt, &pod_a).await;
    let ctr = create(&mut rt, &pod_a_id, &pod_a, &id, &image)
        .await
        .expect("pod A creates its container");
    assert_eq!(start_and_read_version(&mut rt, &ctr).await, "v1");

    // Everything is on the node: containerd holds the image and the cache its blobs.
    let mut direct = image_client(&ctd.socket).await;
    assert!(
        present(&mut direct, &image).await,
        "containerd holds the image"
    );
    let cached = daemon.cli_json(&["cache", "ls"]);
    assert!(
        cached.as_array().is_some_and(|a| a.len() >= 3),
        "the node cache holds the image's blobs: {cached}"
    );
    // ...but ImageStatus through imagestream hides it, so the kubelet pulls with the pod's
    // credentials every time.
    assert!(
        !present(&mut img, &image).await,
        "a private image is never reported present"
    );

    // Pod B: no secret, then a wrong one, is refused; so is creating a container from the id.
    let pod_b = pod_config("pod-b", "team-b", &logs.path().join("b"));
    let none = pull(&mut img, &image, None, &pod_b)
        .await
        .expect_err("pod B without a secret");
    assert_eq!(none.code(), tonic::Code::PermissionDenied, "{none:?}");
    assert!(none.message().contains("private"), "{none:?}");
    let wrong = pull(&mut img, &image, auth(USER, "not-the-password"), &pod_b)
        .await
        .expect_err("pod B with a wrong secret");
    assert_eq!(wrong.code(), tonic::Code::PermissionDenied, "{wrong:?}");
    let pod_b_id = run_pod(&mut rt, &pod_b).await;
    let denied = create(&mut rt, &pod_b_id, &pod_b, &id, &image)
        .await
        .expect_err("pod B may not create a container from the private image");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let denied = create(&mut rt, &pod_b_id, &pod_b, &id, "")
        .await
        .expect_err("nor from its bare image id");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    remove_pod(&mut rt, &pod_b_id).await;

    // The registry goes away (and the remembered verifications go stale): credentials verified
    // before still work; others are refused as RegistryUnavailable.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(private.take());
    let pod_c = pod_config("pod-c", "team-a", &logs.path().join("c"));
    pull(&mut img, &image, auth(USER, PASSWORD), &pod_c)
        .await
        .expect("credentials verified before are accepted while the registry is down");
    let pod_d = pod_config("pod-d", "team-b", &logs.path().join("d"));
    let offline = pull(&mut img, &image, auth("someone", "else"), &pod_d)
        .await
        .expect_err("unverifiable credentials");
    assert_eq!(offline.code(), tonic::Code::Unknown, "{offline:?}");
    assert!(
        offline.message().starts_with("RegistryUnavailable"),
        "{offline:?}"
    );

    // A pull that fails in the runtime because the registry is unreachable carries the
    // kubelet's RegistryUnavailable convention too (containerd's own message does not).
    let dead = format!("127.0.0.1:{}/nothing/here:v1", free_port());
    let refused = pull(&mut img, &dead, None, &pod_d)
        .await
        .expect_err("a registry that refuses connections");
    assert_eq!(refused.code(), tonic::Code::Unknown, "{refused:?}");
    assert!(
        refused.message().starts_with("RegistryUnavailable: "),
        "{refused:?}"
    );

    remove_pod(&mut rt, &pod_a_id).await;
    let log = daemon.log_text();
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(log.contains("repository is private"), "{log}");
}
