//! Signature policy (issue 21) against the real cosign: images signed with `cosign sign --key`
//! in a real docker-registry, and forgeries of them, go through `tag set`, scheduled import,
//! `--from-stream` following, `tag verify` and rollback (with the registry stopped) under
//! `enforce` and `warn`; then pods: PullImage and CreateContainer of an unverified generation
//! are refused (real containerd behind the proxy), a verified one runs.
//!
//! For every image, `cosign verify` (the reference verifier) is asked first, and imagestream
//! must decide the same: it pins exactly what cosign accepts.
//!
//! Needs `cosign` from `bash scripts/test-tools.sh` and the harness's Debian packages.

mod common;

use common::cosign::{self, CosignKey};
use common::daemon::Daemon;
use common::*;
use imagestream::registry::Digest;
use k8s_cri::v1::{CreateContainerRequest, PullImageRequest};
use std::time::Duration;

/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(30);

const TAG: &str = "team-a/app:prod";

fn generations(d: &Daemon, tag: &str) -> Vec<serde_json::Value> {
    d.cli_json(&["tag", "history", tag])["generations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `tag set TAG REF` must fail naming the tag, the digest and `why`, and write nothing.
fn assert_refused(d: &Daemon, tag: &str, reference: &str, digest: &str, why: &str) {
    let before = d.cli(&["-o", "json", "tag", "history", tag]);
    let out = d.cli(&["tag", "set", tag, reference]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{reference} was pinned");
    for part in [tag, digest, why, "nothing was written"] {
        assert!(err.contains(part), "the error should name {part:?}: {err}");
    }
    let after = d.cli(&["-o", "json", "tag", "history", tag]);
    assert_eq!(before.stdout, after.stdout, "tag {tag} changed");
}

/// `stream policy STREAM --key KEY --mode MODE`.
fn set_policy(d: &Daemon, stream: &str, key: &str, mode: &str) -> serde_json::Value {
    d.cli_json(&["stream", "policy", stream, "--key", key, "--mode", mode])
}

/// The digest of the signature manifest cosign stored for `digest` in `repo`.
fn signature_digest(registry: &Registry, repo: &str, digest: &str) -> String {
    Digest::of(&registry_manifest_bytes(
        &registry.addr,
        repo,
        &cosign::signature_tag(digest),
    ))
    .to_string()
}

#[test]
fn streams_pin_only_digests_whose_cosign_signature_verifies() {
    require_root("the signature policy test");
    let mut registry = Registry::start();
    let key = CosignKey::generate();
    let other = CosignKey::generate();
    let image = |tag: &str| {
        let i = push_random_image_to(&registry.addr, &format!("app:{tag}"), &[4096]);
        (format!("{}/app@{}", registry.addr, i.digest), i.digest)
    };
    let (v1, d1) = image("v1");
    let (v2, d2) = image("v2");
    let (v3, d3) = image("v3");
    let (v4, d4) = image("v4");
    let (v5, d5) = image("v5");
    let (v6, d6) = image("v6");
    let (v7, d7) = image("v7");
    cosign::sign(&key, &v1);
    cosign::sign(&other, &v3); // signed, by a key the stream does not trust
    cosign::copy_signature(&registry.addr, "app", &d1, &d4); // v1's signature under v4's tag
    cosign::sign(&key, &v5);
    cosign::tamper_payload(&registry.addr, "app", &d5);
    cosign::sign(&key, &v6);
    cosign::corrupt_signature(&registry.addr, "app", &d6);
    cosign::sign_as_referrer(&key, &v7); // the OCI 1.1 way: a referrer, no .sig tag
                                         // The reference verifier's verdicts, which imagestream must share.
    let truth: Vec<bool> = [&v1, &v2, &v3, &v4, &v5, &v6]
        .iter()
        .map(|r| cosign::verify(&key, r))
        .collect();
    assert_eq!(truth, [true, false, false, false, false, false]);
    assert!(
        cosign::verify_result_with(&key, &v7, &["--experimental-oci11"]).is_ok(),
        "cosign accepts the referrer"
    );

    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        "prefetch = false\nimport_min_interval_secs = 1\n",
    );
    let public = key.public.display().to_string();
    d.cli_ok(&["stream", "create", "team-a/app", "--lookup-local"]);
    let s = set_policy(&d, "team-a/app", &public, "enforce");
    assert_eq!(s["effective_policy"]["mode"], "enforce", "{s}");
    assert_eq!(
        s["effective_policy"]["keys"][0]["name"], "cosign.pub",
        "{s}"
    );
    assert_eq!(s["effective_policy"]["keys"][0]["algorithm"], "ecdsa-p256");
    let key_id = s["effective_policy"]["keys"][0]["id"]
        .as_str()
        .expect("key id")
        .to_string();

    // Signed by the trusted key: pinned, recorded with the key and the signature manifest.
    d.cli_ok(&["tag", "set", TAG, &v1]);
    let g = &generations(&d, TAG)[0];
    assert_eq!(g["digest"], d1.as_str());
    assert_eq!(g["verification"]["status"], "verified", "{g}");
    assert_eq!(g["verification"]["key"], "cosign.pub");
    assert_eq!(g["verification"]["key_id"], key_id.as_str());
    assert_eq!(
        g["verification"]["signature"],
        signature_digest(&registry, "app", &d1).as_str()
    );
    assert!(g["refused"].is_null(), "{g}");

    // A signature stored as an OCI 1.1 referrer (docker-registry 2.8 has no referrers API:
    // found through the referrers tag schema's index).
    d.cli_ok(&["tag", "set", "team-a/app:referrer", &v7]);
    let g = &generations(&d, "team-a/app:referrer")[0];
    assert_eq!(g["verification"]["status"], "verified", "{g}");
    let index: serde_json::Value = serde_json::from_slice(&registry_manifest_bytes(
        &registry.addr,
        "app",
        &format!("sha256-{}", d7.trim_start_matches("sha256:")),
    ))
    .expect("referrers index");
    assert_eq!(
        g["verification"]["signature"],
        index["manifests"][0]["digest"]
    );

    // Everything cosign rejects is refused, each for its own reason, and nothing is written.
    assert_refused(&d, TAG, &v2, &d2, "no signature");
    assert_refused(&d, TAG, &v3, &d3, "no trusted key matched");
    assert_refused(
        &d,
        TAG,
        &v4,
        &d4,
        &format!("the signature is for {d1}, not {d4}"),
    );
    assert_refused(&d, TAG, &v5, &d5, "no trusted key matched");
    assert_refused(&d, TAG, &v6, &d6, "no trusted key matched");
    // A new tag is not created either.
    let out = d.cli(&["tag", "set", "team-a/app:new", &v2]);
    assert!(!out.status.success());
    assert!(!d
        .cli(&["tag", "history", "team-a/app:new"])
        .status
        .success());
    assert_eq!(
        d.metric("imagestream_signature_refusals_total{at=\"set\"}"),
        6.0
    );
    assert_eq!(
        d.metric(
            "imagestream_signature_verifications_total{mode=\"enforce\",outcome=\"unsigned\"}"
        ),
        2.0
    );
    assert_eq!(
        d.metric(
            "imagestream_signature_verifications_total{mode=\"enforce\",outcome=\"digest_differs\"}"
        ),
        1.0
    );

    // `--from-stream`: a stream with the same policy follows the verified tag, reusing its
    // check.
    d.cli_ok(&["stream", "create", "team-a/follower"]);
    set_policy(&d, "team-a/follower", &public, "enforce");
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/follower:prod",
        "imagestream.local/team-a/app:prod",
    ]);
    let f = &generations(&d, "team-a/follower:prod")[0];
    assert_eq!(f["digest"], d1.as_str());
    assert_eq!(f["verification"]["status"], "verified", "{f}");

    // warn: unverified digests are pinned, recorded and counted, not refused.
    set_policy(&d, "team-a/app", &public, "warn");
    d.cli_ok(&["tag", "set", TAG, &v2]);
    d.cli_ok(&["tag", "set", TAG, &v3]);
    let gs = generations(&d, TAG);
    assert_eq!(gs.len(), 3);
    assert_eq!(gs[0]["digest"], d3.as_str());
    assert_eq!(gs[0]["verification"]["status"], "failed", "{}", gs[0]);
    assert!(gs[0]["verification"]["error"]
        .as_str()
        .is_some_and(|e| e.contains("no trusted key matched")));
    assert_eq!(gs[1]["verification"]["status"], "failed");
    assert!(gs[0]["refused"].is_null(), "warn refuses nothing");
    assert_eq!(
        d.metric("imagestream_signature_verifications_total{mode=\"warn\",outcome=\"unsigned\"}"),
        1.0
    );
    // The follower has an enforce policy: it does not follow an unverified digest.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        generations(&d, "team-a/follower:prod")[0]["digest"],
        d1.as_str()
    );

    // Tightened to enforce: `stream get` shows the unverified generations as refused.
    set_policy(&d, "team-a/app", &public, "enforce");
    let s = d.cli_json(&["stream", "get", "team-a/app"]);
    let current = &s["tags"][0]["generations"][0];
    assert_eq!(current["digest"], d3.as_str());
    assert!(
        current["refused"]
            .as_str()
            .is_some_and(|r| r.contains("did not verify")),
        "{s}"
    );
    let table = d.cli_ok(&["stream", "get", "team-a/app"]);
    assert!(table.contains("REFUSED"), "{table}");
    assert!(
        table.contains("Signatures:    enforce: cosign.pub"),
        "{table}"
    );
    // `tag verify` fails while the current generation does not verify.
    let out = d.cli(&["tag", "verify", TAG]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("generation 3"));
    // A rollback to an unverified generation is refused; once signed, it goes through.
    let out = d.cli(&["tag", "rollback", TAG, "--to-generation", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no signature"),
        "{err}"
    );
    cosign::sign(&key, &v2);
    assert!(cosign::verify(&key, &v2));
    d.cli_ok(&["tag", "rollback", TAG, "--to-generation", "2"]);
    let g = &generations(&d, TAG)[0];
    assert_eq!(g["digest"], d2.as_str());
    assert_eq!(g["verification"]["status"], "verified", "{g}");
    assert!(g["refused"].is_null());
    d.cli_ok(&["tag", "verify", TAG]);
    assert_eq!(
        generations(&d, TAG)[2]["verification"]["status"],
        "verified",
        "tag verify recorded generation 2 as verified"
    );
    // The follower follows now.
    d.wait_for("the follower to follow the verified v2", WAIT, || {
        generations(&d, "team-a/follower:prod")[0]["digest"] == d2.as_str()
    });

    // Scheduled import: an unsigned new digest keeps the old pin and says why.
    let moving = |version: &str| {
        push_random_image_to(&registry.addr, "app:moving", &[4096 + version.len()]).digest
    };
    let m1 = moving("m1");
    cosign::sign(&key, &format!("{}/app@{m1}", registry.addr));
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/app:sched",
        &registry.image_ref("app:moving"),
        "--scheduled",
        "--interval",
        "1s",
    ]);
    let m2 = moving("m2-unsigned");
    d.wait_for(
        "the scheduled import to refuse the unsigned digest",
        WAIT,
        || {
            d.cli_json(&["tag", "history", "team-a/app:sched"])["import_condition"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("no signature") && e.contains(&m2))
        },
    );
    let gs = generations(&d, "team-a/app:sched");
    assert_eq!(gs.len(), 1, "the tag kept its pin");
    assert_eq!(gs[0]["digest"], m1.as_str());
    assert!(d.metric("imagestream_signature_refusals_total{at=\"scheduled-import\"}") >= 1.0);
    cosign::sign(&key, &format!("{}/app@{m2}", registry.addr));
    d.wait_for(
        "the scheduled import to move once m2 is signed",
        WAIT,
        || generations(&d, "team-a/app:sched")[0]["digest"] == m2.as_str(),
    );

    // The registry goes away: rollbacks still verify, from the signatures in the node cache.
    registry.stop();
    d.cli_ok(&["tag", "rollback", TAG, "--to-generation", "1"]);
    let g = &generations(&d, TAG)[0];
    assert_eq!(g["digest"], d1.as_str());
    assert_eq!(g["verification"]["status"], "verified", "{g}");
    // `tag verify` works offline too: verified generations verify again from the cache, and a
    // failed one keeps its reason rather than "cannot be fetched".
    d.cli_ok(&["tag", "verify", TAG]);
    let gs = generations(&d, TAG);
    assert_eq!(gs[0]["verification"]["status"], "verified", "{}", gs[0]);
    let g3 = gs
        .iter()
        .find(|g| g["digest"] == d3.as_str())
        .expect("v3's generation");
    assert!(
        g3["verification"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no trusted key matched")),
        "{g3}"
    );
    let ls = d.cli_json(&["cache", "ls"]);
    let sig1 = signature_digest_cached(&ls, "(signature)");
    assert!(sig1, "the signature manifests are pinned: {ls}");
}

/// Whether some cached blob is pinned by a label containing `marker`.
fn signature_digest_cached(ls: &serde_json::Value, marker: &str) -> bool {
    ls.as_array().is_some_and(|blobs| {
        blobs.iter().any(|b| {
            b["pinned_by"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|l| l.as_str().is_some_and(|l| l.contains(marker)))
            })
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_run_only_verified_generations_under_enforce() {
    require_root("the signature policy pod test");
    let registry = Registry::start();
    push_pause_image(&registry);
    let d1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let d = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    let key = CosignKey::generate();
    let public = key.public.display().to_string();
    d.cli_ok(&["stream", "create", "team-a/app", "--lookup-local"]);
    // Pinned before any policy: no verification recorded.
    d.cli_ok(&["tag", "set", TAG, &registry.image_ref("app:v1")]);
    set_policy(&d, "team-a/app", &public, "enforce");

    let logs = d.dir.path().join("pod-logs");
    let pod = pod_config("p1", "team-a", &logs.join("p1"));
    let mut img = image_client(&d.cri_socket).await;
    let mut rt = runtime_client(&d.cri_socket).await;
    for reference in ["app:prod", "imagestream.local/team-a/app:prod"] {
        let err = img
            .pull_image(PullImageRequest {
                image: Some(image_spec(reference)),
                auth: None,
                sandbox_config: Some(pod.clone()),
            })
            .await
            .expect_err("an unverified generation is not pulled");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        for part in [TAG, "generation 1", d1.as_str(), "imagestream tag verify"] {
            assert!(err.message().contains(part), "{part:?}: {}", err.message());
        }
    }
    // CreateContainer as the kubelet sends it (the image id, the pod's reference kept in
    // user_specified_image) is refused too, even when the runtime holds the image.
    let mut direct = image_client(&ctd.socket).await;
    let pulled = direct
        .pull_image(PullImageRequest {
            image: Some(image_spec(&format!("{}/app@{d1}", registry.addr))),
            auth: None,
            sandbox_config: None,
        })
        .await
        .expect("pull v1 directly")
        .into_inner()
        .image_ref;
    let pod_id = run_pod(&mut rt, &pod).await;
    let mut cfg = container_config_with_command("app", &pulled, &["/bin/sleep", "infinity"]);
    if let Some(i) = cfg.image.as_mut() {
        i.user_specified_image = "app:prod".into();
    }
    let err = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(cfg.clone()),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .expect_err("an unverified generation does not run");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(d.metric("imagestream_signature_refusals_total{at=\"PullImage\"}") >= 2.0);
    assert!(d.metric("imagestream_signature_refusals_total{at=\"CreateContainer\"}") >= 1.0);

    // Signed and verified again: the same pod pulls and runs it.
    cosign::sign(&key, &format!("{}/app@{d1}", registry.addr));
    d.cli_ok(&["tag", "verify", TAG]);
    img.pull_image(PullImageRequest {
        image: Some(image_spec("app:prod")),
        auth: None,
        sandbox_config: Some(pod.clone()),
    })
    .await
    .expect("a verified generation is pulled");
    let ctr = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(cfg),
            sandbox_config: Some(pod),
        })
        .await
        .expect("a verified generation runs")
        .into_inner()
        .container_id;
    assert_eq!(start_and_read_version(&mut rt, &ctr).await, "v1");
    remove_pod(&mut rt, &pod_id).await;
}

#[test]
fn the_node_default_policy_applies_to_streams_without_their_own() {
    require_root("the node default signature policy test");
    let registry = Registry::start();
    let key = CosignKey::generate();
    let signed = push_random_image_to(&registry.addr, "app:signed", &[4096]).digest;
    let unsigned = push_random_image_to(&registry.addr, "app:unsigned", &[4096]).digest;
    let signed_ref = format!("{}/app@{signed}", registry.addr);
    let unsigned_ref = format!("{}/app@{unsigned}", registry.addr);
    cosign::sign(&key, &signed_ref);
    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        &format!(
            "prefetch = false\nsignature_policy = \"enforce\"\nsignature_keys = [{:?}]\n",
            key.public.display().to_string()
        ),
    );
    d.cli_ok(&["stream", "create", "team-a/app"]);
    let s = d.cli_json(&["stream", "get", "team-a/app"]);
    assert!(s["policy"].is_null(), "{s}");
    assert_eq!(s["effective_policy"]["mode"], "enforce", "{s}");
    assert_eq!(s["effective_policy"]["node_default"], true, "{s}");
    assert_refused(&d, TAG, &unsigned_ref, &unsigned, "no signature");
    d.cli_ok(&["tag", "set", TAG, &signed_ref]);
    // The stream's own `off` overrides the node's default.
    d.cli_ok(&["stream", "policy", "team-a/app", "--mode", "off"]);
    d.cli_ok(&["tag", "set", TAG, &unsigned_ref]);
    // --clear: the default applies again, and the unsigned current generation is refused.
    d.cli_ok(&["stream", "policy", "team-a/app", "--clear"]);
    let out = d.cli(&["tag", "verify", TAG]);
    assert!(!out.status.success());
    let g = &generations(&d, TAG)[0];
    assert_eq!(g["verification"]["status"], "failed", "{g}");
    assert!(
        g["refused"]
            .as_str()
            .is_some_and(|r| r.contains("no signature")),
        "{g}"
    );

    // A config naming a policy without keys, or an unreadable key, does not start.
    for (toml, needle) in [
        ("signature_policy = \"enforce\"\n", "signature_keys"),
        (
            "signature_policy = \"warn\"\nsignature_keys = [\"/nonexistent/cosign.pub\"]\n",
            "/nonexistent/cosign.pub",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml).expect("write config");
        let out = std::process::Command::new(common::daemon::binary())
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--state-dir"])
            .arg(dir.path().join("state"))
            .args(["--cri-socket"])
            .arg(dir.path().join("cri.sock"))
            .args(["--admin-socket"])
            .arg(dir.path().join("admin.sock"))
            .output()
            .expect("run imagestream serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {toml:?}");
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
}
