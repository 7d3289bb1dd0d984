//! The mirror pulls through from a registry that requires credentials (real docker-registry
//! with htpasswd basic auth), with the credentials from a docker `config.json`; without them it
//! answers UNAUTHORIZED; the password never reaches the daemon's log.

mod common;

use common::auth::{docker_config_json, HtpasswdRegistry};
use common::daemon::Daemon;
use common::*;
use std::time::{Duration, Instant};

const USER: &str = "puller";
const PASSWORD: &str = "s3cret-Pa55word";

/// `docker config.json` with the test user's credentials for `host`.
fn config_json(host: &str) -> String {
    docker_config_json(host, USER, PASSWORD)
}

#[test]
fn the_mirror_uses_configured_credentials_and_never_logs_them() {
    require_root("the mirror auth test");
    let origin = Registry::start();
    let digest = push_image_to(&origin.addr, "private/app", "v1", "v1", &["/bin/sh"]);
    let auth = HtpasswdRegistry::start(&origin.dir.join("data"), USER, PASSWORD);
    assert_eq!(
        http_get_status(&auth.addr, &format!("/v2/private/app/manifests/{digest}")),
        Some(401),
        "the authenticated registry must refuse anonymous pulls"
    );

    // Without credentials: the mirror says UNAUTHORIZED and caches nothing.
    let anonymous = Daemon::start("unix:///nonexistent.sock", &[&auth.addr], &[]);
    let (status, body) = http_request(
        &anonymous.mirror_addr,
        "GET",
        &format!("/v2/private/app/manifests/v1?ns={}", auth.addr),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .expect("mirror answers");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("UNAUTHORIZED"), "{body}");
    drop(anonymous);

    // With a docker config.json naming the registry.
    let dir = tempfile::tempdir().expect("tempdir");
    let auth_file = dir.path().join("auth.json");
    std::fs::write(&auth_file, config_json(&auth.addr)).expect("write auth.json");
    let d = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&auth.addr],
        &[],
        &format!(
            "registry_auth_file = {:?}\nimport_min_interval_secs = 1\n",
            auth_file.display().to_string()
        ),
    );
    let (status, body) = http_request(
        &d.mirror_addr,
        "GET",
        &format!("/v2/private/app/manifests/v1?ns={}", auth.addr),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .expect("mirror answers");
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        d.log_text()
    );
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("a layer")
        .to_string();
    let (status, blob) = http_request(
        &d.mirror_addr,
        "GET",
        &format!("/v2/private/app/blobs/{layer}?ns={}", auth.addr),
        &[],
    )
    .expect("mirror answers");
    assert_eq!(status, 200, "{}", d.log_text());
    assert!(!blob.is_empty());
    assert!(d
        .state_dir
        .join("blobs/sha256")
        .join(&layer["sha256:".len()..])
        .exists());

    // Pinning a tag uses the same credentials.
    d.cli_ok(&["stream", "create", "team-a/private"]);
    let out = d.cli_ok(&[
        "tag",
        "set",
        "team-a/private:prod",
        &format!("{}/private/app:v1", auth.addr),
    ]);
    assert!(out.contains(&digest[..19]), "{out}");

    // A scheduled tag on the authenticated registry imports with the credentials; without
    // them (same state, credentials removed) its condition says the registry refused access
    // and the tag keeps its digest.
    d.cli_ok(&[
        "tag",
        "set",
        "team-a/private:follow",
        &format!("{}/private/app:v1", auth.addr),
        "--scheduled",
        "--interval",
        "1s",
    ]);
    let mut d = d;
    let config = d.config_file.clone().expect("config file");
    std::fs::write(&config, "import_min_interval_secs = 1\n").expect("rewrite config");
    d.stop();
    d.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    let condition = loop {
        let h = d.cli_json(&["tag", "history", "team-a/private:follow"]);
        let error = h["import_condition"]["error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if !error.is_empty() {
            assert_eq!(h["generations"][0]["digest"], digest.as_str(), "{h}");
            break error;
        }
        assert!(
            Instant::now() < deadline,
            "no failing condition: {h}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(condition.contains("refused access"), "{condition}");

    let log = d.log_text();
    assert!(
        !log.contains(PASSWORD),
        "the password reached the log:\n{log}"
    );
    let b64 = config_json("x");
    let b64 = b64
        .split("\"auth\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or("");
    assert!(
        !log.contains(b64),
        "the encoded credentials reached the log"
    );
}
