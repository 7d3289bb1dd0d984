//! The end-to-end story of image streams against real containerd and a real registry: a pod
//! naming a stream tag runs the pinned digest; `tag set` moves it, `tag rollback` moves it back,
//! the history shows every generation and survives a daemon restart; a pod in another namespace
//! gets `NotFound`.

mod common;

use common::daemon::Daemon;
use common::*;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CreateContainerRequest, ExecSyncRequest, ImageStatusRequest, PodSandboxConfig,
    PullImageRequest, RemoveImageRequest, StartContainerRequest,
};
use tonic::transport::Channel;
use tonic::Code;

struct Node {
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    logs: tempfile::TempDir,
}

impl Node {
    async fn new(daemon: &Daemon) -> Node {
        Node {
            rt: runtime_client(&daemon.cri_socket).await,
            img: image_client(&daemon.cri_socket).await,
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    /// What the kubelet does for a pod whose container names `image`: ImageStatus, PullImage
    /// if not present, then run a pod and a container from it; returns the container's
    /// `/version` and the image ref the pull returned.
    async fn run(&mut self, pod_name: &str, namespace: &str, image: &str) -> (String, String) {
        let pod = pod_config(pod_name, namespace, &self.logs.path().join(pod_name));
        let present = self
            .img
            .image_status(ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .expect("ImageStatus")
            .into_inner()
            .image;
        let image_ref = match present {
            Some(i) => i.id,
            None => self.pull(image, &pod).await.expect("PullImage"),
        };
        let pod_id = run_pod(&mut self.rt, &pod).await;
        // The container names the stream reference itself: CreateContainer must rewrite it.
        let cfg = container_config_with_command("app", image, &["/bin/sleep", "infinity"]);
        let ctr = self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(cfg),
                sandbox_config: Some(pod),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        self.rt
            .start_container(StartContainerRequest {
                container_id: ctr.clone(),
            })
            .await
            .expect("StartContainer");
        let out = self
            .rt
            .exec_sync(ExecSyncRequest {
                container_id: ctr,
                cmd: vec!["cat".into(), "/version".into()],
                timeout: 10,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        remove_pod(&mut self.rt, &pod_id).await;
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            image_ref,
        )
    }

    async fn pull(&mut self, image: &str, pod: &PodSandboxConfig) -> Result<String, tonic::Status> {
        Ok(self
            .img
            .pull_image(PullImageRequest {
                image: Some(image_spec(image)),
                auth: None,
                sandbox_config: Some(pod.clone()),
            })
            .await?
            .into_inner()
            .image_ref)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_story_set_move_rollback_restart() {
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let mut daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    let mut direct = image_client(&ctd.socket).await;

    daemon.cli_ok(&["stream", "create", "team-a/app", "--lookup-local"]);
    let tag = daemon.cli_json(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    assert_eq!(tag["generations"][0]["digest"], v1.as_str());
    assert_eq!(
        tag["generations"][0]["reference"],
        format!("{}/app@{v1}", registry.addr)
    );

    // A pod in team-a runs app:prod: v1, and the runtime holds v1's digest.
    let mut node = Node::new(&daemon).await;
    let (version, v1_id) = node.run("p1", "team-a", "app:prod").await;
    assert_eq!(version, "v1");
    let held = direct
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&format!("{}/app@{v1}", registry.addr))),
            verbose: false,
        })
        .await
        .expect("ImageStatus direct")
        .into_inner()
        .image
        .expect("runtime holds v1's digest");
    // The proxy's pull answered what a direct pull of the pinned digest answers (containerd:
    // the image id; CRI-O: the pinned reference).
    let direct_ref = direct
        .pull_image(PullImageRequest {
            image: Some(image_spec(&format!("{}/app@{v1}", registry.addr))),
            ..Default::default()
        })
        .await
        .expect("PullImage direct")
        .into_inner()
        .image_ref;
    assert_eq!(direct_ref, v1_id, "the runtime holds {}", held.id);
    // A second pull of the same pinned digest is answered without pulling again.
    let again = node
        .pull("app:prod", &pod_config("p1b", "team-a", node.logs.path()))
        .await
        .expect("PullImage again");
    assert_eq!(again, v1_id);
    // The explicit stream reference.
    let explicit = "imagestream.local/team-a/app:prod";
    let st = node
        .img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(explicit)),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    // ImageStatus never reports a stream reference present: it carries no namespace, so the
    // kubelet must go on to PullImage and its access check (which answers at once).
    assert!(st.image.is_none());

    // Move the tag to v2: ImageStatus of the stream reference stops reporting v1, and the next
    // pod runs v2.
    daemon.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    let st = node
        .img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(explicit)),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(
        st.image.is_none(),
        "ImageStatus still reports the old image after the tag moved"
    );
    let (version, v2_id) = node.run("p2", "team-a", "app:prod").await;
    assert_eq!(version, "v2");
    assert_ne!(v2_id, v1_id);
    daemon.cli_ok(&["stream", "access", "team-a/app", "--allow", "team-x"]);
    let (version, _) = node.run("p2b", "team-x", explicit).await;
    assert_eq!(version, "v2");

    // Roll back: v1 again.
    let out = daemon.cli_ok(&["tag", "rollback", "team-a/app:prod"]);
    assert!(out.contains("rollback to generation 1"), "{out}");
    let (version, id) = node.run("p3", "team-a", "app:prod").await;
    assert_eq!(version, "v1");
    assert_eq!(id, v1_id);
    let resolved = daemon.cli_json(&["resolve", "app:prod", "--namespace", "team-a"]);
    assert_eq!(resolved["digest"], v1.as_str());

    // History: three generations, newest first.
    let history = daemon.cli_json(&["tag", "history", "team-a/app:prod"]);
    let gens = history["generations"]
        .as_array()
        .expect("generations")
        .clone();
    let summary: Vec<(u64, String, String)> = gens
        .iter()
        .map(|g| {
            (
                g["generation"].as_u64().unwrap_or(0),
                g["digest"].as_str().unwrap_or("").to_string(),
                g["cause"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (3, v1.clone(), "rollback to generation 1".to_string()),
            (2, v2.clone(), "set".to_string()),
            (1, v1.clone(), "set".to_string()),
        ]
    );
    assert_eq!(
        gens[0]["source"],
        registry.image_ref("app:v1").as_str(),
        "a rollback keeps the source of the generation it goes back to"
    );
    let table = daemon.cli_ok(&["tag", "history", "team-a/app:prod"]);
    assert!(table.starts_with("GENERATION"), "{table}");

    // Restart: SIGTERM exits 0; streams and history are intact.
    let before = daemon.cli_json(&["stream", "get", "team-a/app"]);
    let status = daemon.stop();
    assert!(status.success(), "SIGTERM exit status {status}");
    daemon.start_again();
    assert_eq!(daemon.cli_json(&["stream", "get", "team-a/app"]), before);
    let mut node = Node::new(&daemon).await;
    let (version, _) = node.run("p4", "team-a", "app:prod").await;
    assert_eq!(version, "v1");

    // A pod in team-b asking for app:prod: there is no such stream there.
    let err = node
        .pull("app:prod", &pod_config("p5", "team-b", node.logs.path()))
        .await
        .expect_err("team-b has no stream app");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("team-b/app"), "{}", err.message());
    // An unknown tag names stream and tag; a malformed stream reference is InvalidArgument.
    let err = node
        .pull("app:nope", &pod_config("p6", "team-a", node.logs.path()))
        .await
        .expect_err("unknown tag");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("nope") && err.message().contains("team-a/app"),
        "{}",
        err.message()
    );
    let err = node
        .pull(
            "imagestream.local/team-a",
            &pod_config("p7", "team-a", node.logs.path()),
        )
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("imagestream.local/team-a"),
        "{}",
        err.message()
    );

    // RemoveImage of the stream reference removes the pinned image.
    node.img
        .remove_image(RemoveImageRequest {
            image: Some(image_spec(explicit)),
        })
        .await
        .expect("RemoveImage");
    let gone = direct
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&format!("{}/app@{v1}", registry.addr))),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(
        gone.image.is_none(),
        "pinned image still present after RemoveImage of the stream reference"
    );
    // ImageStatus / RemoveImage of an unknown stream tag: not present, so that the kubelet goes
    // on to PullImage, whose NotFound names the stream and tag.
    let st = node
        .img
        .image_status(ImageStatusRequest {
            image: Some(image_spec("imagestream.local/team-a/app:nope")),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(st.image.is_none());
    node.img
        .remove_image(RemoveImageRequest {
            image: Some(image_spec("imagestream.local/team-z/app:prod")),
        })
        .await
        .expect("RemoveImage of nothing succeeds");
    // A short name without a namespace is "not present", never an error.
    let st = node
        .img
        .image_status(ImageStatusRequest {
            image: Some(image_spec("app:prod")),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(st.image.is_none());
}
