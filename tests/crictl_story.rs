//! The stream story driven by crictl, Kubernetes' own CRI command line (cri-tools, a grpc-go
//! client built on the kubelet's CRI client library), against imagestream's CRI socket in front
//! of real containerd, with the imagestream CLI moving the tag:
//!
//! - `crictl pull` and `crictl inspecti` of a stream reference, each the first crictl call on a
//!   fresh daemon and each on a connection of its own, answer what the README documents: the
//!   pull returns the image id of the pinned digest, `inspecti` finds no image (ImageStatus
//!   never reports a stream reference present), just as containerd itself answers for a
//!   reference it does not hold. The pinned digest itself, and `crictl images`, look the same
//!   through the proxy as directly against containerd.
//! - A container created (`runp`, `create`, `start`) from the stream reference runs the pinned
//!   version (`crictl exec … cat /version`); after `tag set` a new container runs the new
//!   version while the running one keeps its own; after `tag rollback` the old version again.
//! - A pod in a namespace the stream does not allow is refused, by `crictl pull` and by
//!   `crictl create` (also with the pulled image id and the stream reference as
//!   `user_specified_image`, as the kubelet asks), with `PermissionDenied` and the proxy's
//!   message naming the stream and the namespace; a pull without a pod config (no namespace to
//!   check) is no way around the check at create.
//! - After a daemon restart the stream still resolves, for pulls and creates.
//! - `crictl rmi` of a stream reference: crictl asks ImageStatus before RemoveImage and stops
//!   at its "not present", so it removes nothing; `crictl rmi` of the pinned reference removes
//!   the image.
//!
//! Note that crictl never makes a stream reference's call the first call on its connection:
//! the CRI client library validates a new connection with `ImageFsInfo` (image endpoint) or
//! `Version` (runtime endpoint) first, and grpc-go waits for the server's SETTINGS anyway.

mod common;

use common::crictl::Crictl;
use common::daemon::Daemon;
use common::*;

const STREAM_REF: &str = "imagestream.local/team-a/app:prod";
const SLEEP: &[&str] = &["/bin/sleep", "infinity"];

#[test]
fn crictl_pulls_runs_moves_rolls_back_and_is_refused_through_the_proxy() {
    require_root("the crictl story (containerd and runc)");
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", SLEEP);
    let v2 = push_image(&registry, "app", "v2", "v2", SLEEP);
    let ctd = RuntimeBed::start(&registry);
    let mut daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    let files = tempfile::tempdir().expect("temp dir for crictl's files");
    let proxy = Crictl::new(&daemon.cri_socket, &files.path().join("proxy"));
    let direct = Crictl::new(&ctd.socket, &files.path().join("direct"));
    let pinned_v1 = format!("{}/app@{v1}", registry.addr);
    let pinned_v2 = format!("{}/app@{v2}", registry.addr);

    daemon.cli_ok(&["stream", "create", "team-a/app", "--lookup-local"]);
    daemon.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    let pod_a = proxy.pod_config("a", "team-a");

    // `crictl inspecti` of the stream reference, the first crictl call on the new daemon: no
    // such image (ImageStatus never reports a stream reference present), exit code 1.
    // (crictl's logrus output escapes the quotes: msg="no such image \"REF\" present".)
    let not_present = format!(r#"no such image \"{STREAM_REF}\" present"#);
    let err = proxy.fails(&["inspecti", STREAM_REF]);
    assert!(err.contains(&not_present), "{err}");
    // The same answer containerd gives for a reference it has never heard of.
    let err_direct = direct.fails(&["inspecti", STREAM_REF]);
    assert!(err_direct.contains(&not_present), "{err_direct}");

    // `crictl pull` of the stream reference, on a connection of its own: the image id of the
    // pinned digest, which containerd now holds.
    let out = proxy.ok(&[
        "pull",
        "--pod-config",
        pod_a.to_str().expect("utf-8 path"),
        STREAM_REF,
    ]);
    let v1_id = common::crictl::image_ref_of_pull(&out);
    // The answer a pull of the pinned digest gets directly (containerd: the image id; CRI-O:
    // the pinned reference).
    assert_eq!(direct.pull(&pinned_v1, &pod_a), v1_id);
    let held = direct.inspecti_status(&pinned_v1);
    assert!(
        held["repoDigests"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d == pinned_v1.as_str())),
        "containerd does not list {pinned_v1} among the digests of {v1_id}: {held:#}"
    );
    // Pulled again, and by the short name in the stream's namespace: the same id (the runtime
    // holds it, so the proxy answers at once).
    assert_eq!(proxy.pull(STREAM_REF, &pod_a), v1_id);
    assert_eq!(proxy.pull("app:prod", &pod_a), v1_id);
    // Still "not present" for ImageStatus, though the pinned image is on the node.
    let err = proxy.fails(&["inspecti", STREAM_REF]);
    assert!(err.contains(&not_present), "{err}");
    // Plain references pass through: the pinned digest and the image list look the same
    // through the proxy as directly.
    let through = proxy.json(&["inspecti", "-o", "json", &pinned_v1]);
    assert_eq!(
        through,
        direct.json(&["inspecti", "-o", "json", &pinned_v1])
    );
    assert_eq!(proxy.ok(&["version"]), direct.ok(&["version"]));
    let images = proxy.json(&["images", "-o", "json"]);
    assert_eq!(images, direct.json(&["images", "-o", "json"]));
    assert!(
        images.to_string().contains(&v1_id),
        "crictl images does not list {v1_id}: {images:#}"
    );

    // runp + create + start a container of the stream reference: it runs v1.
    let pod_id = proxy.runp(&pod_a);
    let c1 = proxy.create(
        &pod_id,
        &proxy.container_config("app-1", STREAM_REF, SLEEP),
        &pod_a,
    );
    proxy.start(&c1);
    assert_eq!(proxy.exec(&c1, &["cat", "/version"]), "v1");
    // The runtime created it from the pinned reference. (containerd 1.6 does not keep the
    // user_specified_image the proxy passes on: crictl shows that field empty.)
    let status = &proxy.json(&["inspect", "-o", "json", &c1])["status"];
    assert_eq!(status["image"]["image"], pinned_v1.as_str(), "{status:#}");
    assert_eq!(status["state"], "CONTAINER_RUNNING", "{status:#}");
    let ps = proxy.json(&["ps", "-o", "json"]);
    assert_eq!(ps["containers"][0]["imageRef"], v1_id.as_str(), "{ps:#}");
    assert_eq!(ps, direct.json(&["ps", "-o", "json"]));

    // Move the tag to v2: the pull answers v2's id, a new container runs v2, the running
    // container keeps v1.
    daemon.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    let v2_id = proxy.pull(STREAM_REF, &pod_a);
    assert_ne!(v2_id, v1_id);
    assert_eq!(direct.pull(&pinned_v2, &pod_a), v2_id);
    let c2 = proxy.create(
        &pod_id,
        &proxy.container_config("app-2", STREAM_REF, SLEEP),
        &pod_a,
    );
    proxy.start(&c2);
    assert_eq!(proxy.exec(&c2, &["cat", "/version"]), "v2");
    let status = &proxy.json(&["inspect", "-o", "json", &c2])["status"];
    assert_eq!(status["image"]["image"], pinned_v2.as_str(), "{status:#}");
    assert_eq!(proxy.exec(&c1, &["cat", "/version"]), "v1");

    // Roll back: v1 again for new containers.
    let out = daemon.cli_ok(&["tag", "rollback", "team-a/app:prod"]);
    assert!(out.contains("rollback to generation 1"), "{out}");
    assert_eq!(proxy.pull(STREAM_REF, &pod_a), v1_id);
    let c3 = proxy.create(
        &pod_id,
        &proxy.container_config("app-3", STREAM_REF, SLEEP),
        &pod_a,
    );
    proxy.start(&c3);
    assert_eq!(proxy.exec(&c3, &["cat", "/version"]), "v1");
    assert_eq!(proxy.exec(&c2, &["cat", "/version"]), "v2");

    // A pod of team-b may not use team-a/app: crictl shows the proxy's PermissionDenied.
    let pod_b = proxy.pod_config("b", "team-b");
    let denied_pull = proxy.fails(&[
        "pull",
        "--pod-config",
        pod_b.to_str().expect("utf-8 path"),
        STREAM_REF,
    ]);
    assert_denied(&denied_pull);
    let pod_b_id = proxy.runp(&pod_b);
    let create_b = |name: &str, config: &std::path::Path| {
        let out = proxy.run(&[
            "create",
            "--no-pull",
            &pod_b_id,
            config.to_str().expect("utf-8 path"),
            pod_b.to_str().expect("utf-8 path"),
        ]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", out.describe());
        out.stderr
    };
    let denied_create = create_b("b-1", &proxy.container_config("b-1", STREAM_REF, SLEEP));
    assert_denied(&denied_create);
    // As the kubelet asks after a pull: the image id, and the stream reference the pod named.
    let denied_create = create_b(
        "b-2",
        &proxy.container_config_pulled("b-2", &v1_id, STREAM_REF, SLEEP),
    );
    assert_denied(&denied_create);
    // A pull without a pod config carries no namespace, so there is nothing to check: it
    // pulls. The create is still refused.
    let out = proxy.ok(&["pull", STREAM_REF]);
    assert_eq!(common::crictl::image_ref_of_pull(&out), v1_id);
    assert_denied(&create_b(
        "b-3",
        &proxy.container_config("b-3", STREAM_REF, SLEEP),
    ));
    // Allowed, team-b runs it.
    daemon.cli_ok(&["stream", "access", "team-a/app", "--allow", "team-b"]);
    assert_eq!(proxy.pull(STREAM_REF, &pod_b), v1_id);
    let b4 = proxy.create(
        &pod_b_id,
        &proxy.container_config("b-4", STREAM_REF, SLEEP),
        &pod_b,
    );
    proxy.start(&b4);
    assert_eq!(proxy.exec(&b4, &["cat", "/version"]), "v1");
    daemon.cli_ok(&["stream", "access", "team-a/app", "--reset"]);
    assert_denied(&create_b(
        "b-5",
        &proxy.container_config("b-5", STREAM_REF, SLEEP),
    ));

    // Restart the daemon: the stream still resolves (to the rolled-back v1), and the pods and
    // containers made before are still reachable through it. The pull is the first crictl call
    // on the restarted daemon.
    let status = daemon.stop();
    assert!(status.success(), "SIGTERM exit status {status}");
    daemon.start_again();
    assert_eq!(proxy.pull(STREAM_REF, &pod_a), v1_id);
    let c4 = proxy.create(
        &pod_id,
        &proxy.container_config("app-4", STREAM_REF, SLEEP),
        &pod_a,
    );
    proxy.start(&c4);
    assert_eq!(proxy.exec(&c4, &["cat", "/version"]), "v1");
    assert_eq!(proxy.exec(&c2, &["cat", "/version"]), "v2");
    proxy.remove_pod(&pod_b_id);
    proxy.remove_pod(&pod_id);

    // `crictl rmi` of the stream reference: crictl first asks ImageStatus, which says "not
    // present", and so it never sends RemoveImage; the pinned image stays.
    let rmi = proxy.run(&["rmi", STREAM_REF]);
    assert_eq!(rmi.status.code(), Some(1), "{}", rmi.describe());
    assert!(
        rmi.stderr.contains(&format!("no such image {STREAM_REF}")),
        "{}",
        rmi.describe()
    );
    assert!(direct.inspecti_status(&pinned_v1)["id"].is_string());
    // `crictl rmi` of the pinned reference through the proxy removes it.
    let out = proxy.ok(&["rmi", &pinned_v1]);
    assert!(out.contains(&pinned_v1), "{out}");
    let err = direct.fails(&["inspecti", &pinned_v1]);
    assert!(
        err.contains(&format!(r#"no such image \"{pinned_v1}\" present"#)),
        "{err}"
    );
}

/// crictl's stderr for a call the proxy refused because team-b may not use team-a/app.
fn assert_denied(stderr: &str) {
    assert!(
        stderr.contains("code = PermissionDenied")
            && stderr.contains("pods of namespace team-b may not use image stream team-a/app"),
        "expected the proxy's PermissionDenied for team-b, crictl said:\n{stderr}"
    );
}
