//! Who may use which stream: a stream is usable by its own namespace only, unless its access
//! list allows more; the check runs in PullImage and again in CreateContainer (also for the
//! `user_specified_image` the kubelet passes with a pulled image id), so an image already on the
//! node is no way around it.

mod common;

use common::daemon::Daemon;
use common::*;
use k8s_cri::v1::{CreateContainerRequest, ImageSpec, ImageStatusRequest, PullImageRequest};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn another_namespace_is_denied_until_allowed_also_when_the_image_is_present() {
    let registry = Registry::start();
    push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    let logs = tempfile::tempdir().expect("log dir");
    daemon.cli_ok(&["stream", "create", "team-a/app"]);
    daemon.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    let stream_ref = "imagestream.local/team-a/app:prod";
    let mut img = image_client(&daemon.cri_socket).await;
    let mut rt = runtime_client(&daemon.cri_socket).await;

    // team-a pulls: the image is now on the node.
    let pod_a = pod_config("a", "team-a", &logs.path().join("a"));
    let image_id = img
        .pull_image(PullImageRequest {
            image: Some(image_spec(stream_ref)),
            auth: None,
            sandbox_config: Some(pod_a),
        })
        .await
        .expect("team-a pulls its own stream")
        .into_inner()
        .image_ref;

    // team-b: ImageStatus does not say "present" (so the kubelet must call PullImage) ...
    let st = img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(stream_ref)),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(
        st.image.is_none(),
        "ImageStatus reported a stream reference present"
    );
    // ... PullImage is denied, naming stream and namespace ...
    let pod_b = pod_config("b", "team-b", &logs.path().join("b"));
    let err = img
        .pull_image(PullImageRequest {
            image: Some(image_spec(stream_ref)),
            auth: None,
            sandbox_config: Some(pod_b.clone()),
        })
        .await
        .expect_err("team-b may not use team-a/app");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("team-a/app") && err.message().contains("team-b"),
        "{}",
        err.message()
    );

    // ... and CreateContainer is denied too, both with the stream reference and with the image
    // id the kubelet would pass (user_specified_image keeps the stream reference).
    let pod_id = run_pod(&mut rt, &pod_b).await;
    for spec in [
        image_spec(stream_ref),
        ImageSpec {
            image: image_id.clone(),
            user_specified_image: stream_ref.to_string(),
            ..Default::default()
        },
    ] {
        let mut cfg =
            container_config_with_command("app", &spec.image, &["/bin/sleep", "infinity"]);
        cfg.image = Some(spec.clone());
        let err = rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(cfg),
                sandbox_config: Some(pod_b.clone()),
            })
            .await
            .expect_err("CreateContainer in team-b must be denied");
        assert_eq!(err.code(), Code::PermissionDenied, "{spec:?}: {err:?}");
    }

    // `resolve` as a pod of team-b is denied too.
    let out = daemon.cli(&["resolve", stream_ref, "--namespace", "team-b"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not use"));

    // Allow team-* : team-b may pull and create.
    let shown = daemon.cli_ok(&["stream", "access", "team-a/app", "--allow", "team-*"]);
    assert!(shown.contains("team-*"), "{shown}");
    let got = img
        .pull_image(PullImageRequest {
            image: Some(image_spec(stream_ref)),
            auth: None,
            sandbox_config: Some(pod_b.clone()),
        })
        .await
        .expect("allowed after --allow team-*")
        .into_inner()
        .image_ref;
    assert_eq!(got, image_id);
    let cfg = container_config_with_command("app", stream_ref, &["/bin/sleep", "infinity"]);
    rt.create_container(CreateContainerRequest {
        pod_sandbox_id: pod_id.clone(),
        config: Some(cfg),
        sandbox_config: Some(pod_b.clone()),
    })
    .await
    .expect("CreateContainer allowed");

    // A deny wins over the allow; `stream get` shows the lists.
    daemon.cli_ok(&["stream", "access", "team-a/app", "--deny", "team-b"]);
    let s = daemon.cli_json(&["stream", "get", "team-a/app"]);
    assert_eq!(
        s["access"],
        serde_json::json!({"allow": ["team-*"], "deny": ["team-b"]})
    );
    let err = img
        .pull_image(PullImageRequest {
            image: Some(image_spec(stream_ref)),
            auth: None,
            sandbox_config: Some(pod_b),
        })
        .await
        .expect_err("denied again");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        daemon.log_text().contains("stream use denied"),
        "no audit record of the denial"
    );

    // Bad patterns are refused, naming them.
    let out = daemon.cli(&["stream", "access", "team-a/app", "--allow", "../x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("../x"));

    remove_pod(&mut rt, &pod_id).await;
}
