//! A real kubelet (v1.34, standalone: static pods, no API server) in front of imagestream, in
//! front of the runtime of `IMAGESTREAM_TEST_RUNTIME` (containerd 2 by default). How the kubelet
//! is run, with the reason for every flag, is in `tests/common/kubelet.rs`.
//!
//! The story:
//! - A stream `team-a/app` with tag `prod` → v1. A static pod in namespace `team-a` with image
//!   `imagestream.local/team-a/app:prod` runs; its container's image (CRI `ContainerStatus`
//!   `image_ref`, the same through imagestream as on the runtime's own socket, and the kubelet's
//!   pod status `imageID`) is v1's, as the runtime itself names the pinned v1 image
//!   (`ImageStatus` directly on the runtime's socket).
//! - A static pod in namespace `team-b` with the same image never gets a container: the kubelet
//!   reports it waiting in `ErrImagePull` / `ImagePullBackOff` with imagestream's
//!   `PermissionDenied` message, in its pod status and in its log.
//! - `prod` moves to v2; the pod is deleted and written again under a new name (the kubelet
//!   starts a pod of a new name at once; the same name with new content waits for the old pod's
//!   cleanup, see the module docs of `common::kubelet`): the new pod runs v2 and the old one is
//!   stopped.
//! - Teardown leaves no process, no mount and no pod sandbox of the kubelet behind.
//!
//! A kubelet that cannot start fails the test with the kubelet's own reason (never a skip):
//! `a_kubelet_that_cannot_start_fails_with_its_reason`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::kubelet::Kubelet;
use common::*;
use k8s_cri::v1::{
    ContainerStatus, ContainerStatusRequest, Image, ImageStatusRequest, ListPodSandboxRequest,
};

const STREAM_REF: &str = "imagestream.local/team-a/app:prod";
const SLEEP: &[&str] = &["/bin/sleep", "infinity"];
/// The pods' command: sleeps, but exits at once on SIGTERM (the images' own `sleep` as PID 1
/// ignores it, and a deleted pod would take the kubelet's minimum grace period, 2 s, to stop).
const QUICK_EXIT: &[&str] = &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"];
/// For a pod to run, or to show its image error (about 1 s each here).
const POD_TIMEOUT: Duration = Duration::from_secs(60);
/// What imagestream answers a pod of team-b (`src/stream/resolve.rs`, `AccessDenied`).
const DENIED: &str = "pods of namespace team-b may not use image stream team-a/app";

#[test]
fn kubelet_runs_static_pods_of_a_stream_reference_through_imagestream() {
    require_root("the kubelet story (kubelet, runtime and runc)");
    let mut phases = Phases::new();

    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", SLEEP);
    let v2 = push_image(&registry, "app", "v2", "v2", SLEEP);
    let pinned_v1 = format!("{}/app@{v1}", registry.addr);
    let pinned_v2 = format!("{}/app@{v2}", registry.addr);
    phases.done("registry with v1 and v2");
    let bed = RuntimeBed::start(&registry);
    phases.done(&format!("runtime bed ({})", bed.kind.name()));
    let daemon = Daemon::start(&bed.endpoint(), &[&registry.addr], &[]);
    daemon.cli_ok(&["stream", "create", "team-a/app"]);
    daemon.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    phases.done("imagestream, team-a/app:prod -> v1");
    let kubelet = Kubelet::start(&daemon.cri_socket);
    let kubelet_dir = kubelet.dir.clone();
    let node_suffix = format!("-{}", kubelet.node_name);
    phases.done("kubelet up");

    // Both pods at once: team-a's runs v1, team-b's is refused.
    let app = kubelet.write_static_pod_with_command("app", "team-a", STREAM_REF, QUICK_EXIT);
    let denied = kubelet.write_static_pod("b", "team-b", STREAM_REF);
    let c1 = kubelet.wait_running_container(&app, "team-a", POD_TIMEOUT);
    let direct_v1 = runtime_image(&bed.socket, &pinned_v1);
    assert_runs(&kubelet, &bed.socket, &app, &c1, &direct_v1, &v1);
    phases.done("team-a pod runs v1");

    let (reason, message) = kubelet.wait_image_error(&denied, "team-b", POD_TIMEOUT);
    assert!(
        message.contains("code = PermissionDenied") && message.contains(DENIED),
        "the kubelet shows pod {denied} waiting ({reason}) with another message: {message}"
    );
    assert!(
        message.contains(STREAM_REF),
        "the message does not name the reference: {message}"
    );
    let logged = kubelet.log_lines_with(DENIED);
    assert!(
        logged.iter().any(|l| l.contains(&denied)),
        "no kubelet log line about pod {denied} carries imagestream's message; lines with it: \
         {logged:#?}"
    );
    assert!(
        kubelet.containers_of(&denied, "team-b").is_empty(),
        "the runtime holds a container of the refused pod {denied}"
    );
    phases.done(&format!("team-b pod refused ({reason})"));

    // Move the tag; delete the pod and write it again under a new name: v2.
    daemon.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    kubelet.remove_static_pod("app");
    let app2 = kubelet.write_static_pod_with_command("app-2", "team-a", STREAM_REF, QUICK_EXIT);
    let c2 = kubelet.wait_running_container(&app2, "team-a", POD_TIMEOUT);
    let direct_v2 = runtime_image(&bed.socket, &pinned_v2);
    assert_ne!(
        direct_v1.id, direct_v2.id,
        "v1 and v2 have the same image id"
    );
    assert_runs(&kubelet, &bed.socket, &app2, &c2, &direct_v2, &v2);
    phases.done("prod -> v2, rewritten pod runs v2");
    kubelet.wait_no_running_container(&app, "team-a", Duration::from_secs(30));
    phases.done("deleted pod stopped");

    // Teardown, in order, and nothing of the kubelet left behind.
    drop(kubelet);
    assert_eq!(
        processes_mentioning(&kubelet_dir),
        Vec::<(u32, String)>::new(),
        "processes of the kubelet survived its teardown"
    );
    assert_eq!(
        mounts_under(&kubelet_dir),
        Vec::<std::path::PathBuf>::new(),
        "mounts of the kubelet survived its teardown"
    );
    let left: Vec<String> = runtime_sandboxes(&bed.socket)
        .into_iter()
        .filter(|name| name.ends_with(&node_suffix))
        .collect();
    assert!(
        left.is_empty(),
        "pod sandboxes left in the runtime: {left:?}"
    );
    assert!(
        !kubelet_dir.exists(),
        "{} not removed",
        kubelet_dir.display()
    );
    phases.done("kubelet teardown");
    drop(daemon);
    drop(bed);
    drop(registry);
    phases.done("bed teardown");
    phases.total();
}

#[test]
#[should_panic(expected = "validate CRI v1 runtime API for endpoint")]
fn a_kubelet_that_cannot_start_fails_with_its_reason() {
    require_root("the kubelet");
    let dir = tempfile::tempdir().expect("temp dir");
    // No runtime behind this socket: the kubelet exits at once, and start panics with its error.
    let _kubelet = Kubelet::start(&dir.path().join("no-runtime.sock"));
}

/// Asserts that container `c` of pod `pod` (team-a; its status through imagestream) runs the
/// image the runtime knows as `direct` (`ImageStatus` of the pinned reference, manifest digest
/// `digest`), in the runtime's own view (on `runtime_socket`) and in the kubelet's.
fn assert_runs(
    kubelet: &Kubelet,
    runtime_socket: &Path,
    pod: &str,
    c: &ContainerStatus,
    direct: &Image,
    digest: &str,
) {
    assert!(
        direct
            .repo_digests
            .iter()
            .any(|d| d.ends_with(&format!("@{digest}"))),
        "the runtime does not list {digest} among the repo digests of {}: {:?}",
        direct.id,
        direct.repo_digests
    );
    let names: Vec<&str> = std::iter::once(direct.id.as_str())
        .chain(direct.repo_digests.iter().map(String::as_str))
        .collect();
    assert!(
        names.contains(&c.image_ref.as_str()),
        "container {} of pod {pod} runs image_ref {:?}, not the image the runtime holds for \
         {digest} ({names:?}); image spec {:?}",
        c.id,
        c.image_ref,
        c.image
    );
    let own = runtime_container(runtime_socket, &c.id);
    assert_eq!(
        (&own.image_ref, &own.image),
        (&c.image_ref, &c.image),
        "ContainerStatus of {} through imagestream differs from the runtime's own",
        c.id
    );
    if let Some(spec) = &c.image {
        // Runtimes that keep it (containerd 2, CRI-O) show what the pod named.
        if !spec.user_specified_image.is_empty() {
            assert_eq!(spec.user_specified_image, STREAM_REF, "{c:?}");
        }
    }
    // The kubelet's pod status says the same (after its next relist, at most 1 s later).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = kubelet.container_status(pod, "team-a");
        let (running, container_id, image_id) = match &status {
            Some(s) => (
                s["state"]["running"].is_object(),
                s["containerID"].as_str().unwrap_or(""),
                s["imageID"].as_str().unwrap_or(""),
            ),
            None => (false, "", ""),
        };
        if running && container_id.ends_with(&format!("://{}", c.id)) {
            assert_eq!(
                image_id, c.image_ref,
                "the kubelet's imageID of pod {pod} differs from the runtime's: {status:#?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the kubelet does not report container {} of pod {pod} running: {status:#?}",
            c.id
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ContainerStatus` of container `id` directly on the runtime's socket.
fn runtime_container(socket: &Path, id: &str) -> ContainerStatus {
    block_on(async {
        runtime_client(socket)
            .await
            .container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus on the runtime")
            .into_inner()
            .status
            .unwrap_or_else(|| panic!("the runtime has no status of container {id}"))
    })
}

/// The names of the pod sandboxes the runtime holds (`ListPodSandbox` on its own socket).
fn runtime_sandboxes(socket: &Path) -> Vec<String> {
    block_on(async {
        runtime_client(socket)
            .await
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .expect("ListPodSandbox on the runtime")
            .into_inner()
            .items
            .into_iter()
            .filter_map(|sb| sb.metadata.map(|m| m.name))
            .collect()
    })
}

/// `ImageStatus` of `reference` directly on the runtime's socket; panics unless it holds it.
fn runtime_image(socket: &Path, reference: &str) -> Image {
    block_on(async {
        image_client(socket)
            .await
            .image_status(ImageStatusRequest {
                image: Some(image_spec(reference)),
                verbose: false,
            })
            .await
            .expect("ImageStatus on the runtime")
            .into_inner()
            .image
            .unwrap_or_else(|| panic!("the runtime does not hold {reference}"))
    })
}

fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(fut)
}

/// Phase timings, printed as they end.
struct Phases {
    start: Instant,
    last: Instant,
}

impl Phases {
    fn new() -> Phases {
        let now = Instant::now();
        Phases {
            start: now,
            last: now,
        }
    }

    fn done(&mut self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "phase {:>6.2} s  {what}",
            now.duration_since(self.last).as_secs_f64()
        );
        self.last = now;
    }

    fn total(&self) {
        eprintln!(
            "total  {:>6.2} s",
            Instant::now().duration_since(self.start).as_secs_f64()
        );
    }
}
