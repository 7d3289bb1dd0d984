//! The CRI socket's limits, each a documented constant in `src/cri/transport.rs`, against real
//! containerd behind the proxy: the concurrent-stream limit is advertised in SETTINGS; a header
//! list over the limit is refused without harming the connection; a decided call's request
//! over its cap is `ResourceExhausted` naming the cap, while a forwarded call of that size goes
//! to the runtime as it would directly; and on SIGTERM a call that outlives the drain grace is
//! cut and the daemon still exits.

mod common;

use common::daemon::Daemon;
use common::*;
use imagestream::cri::transport::{
    MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_BYTES, MAX_REQUEST_BYTES,
};
use k8s_cri::v1::{
    ContainerFilter, CreateContainerRequest, ExecSyncRequest, ListContainersRequest, VersionRequest,
};
use std::collections::HashMap;
use tonic::Code;

/// A raw HTTP/2 connection to a unix socket (no gRPC layer), and its driver task.
async fn raw_h2(socket: &std::path::Path) -> h2::client::SendRequest<bytes::Bytes> {
    let io = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect the CRI socket");
    let (send, conn) = h2::client::handshake(io).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A unary `Version` call on a raw connection; returns its gRPC status.
async fn raw_version(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    extra_header: Option<(&str, String)>,
) -> Result<String, h2::Error> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri("http://localhost/runtime.v1.RuntimeService/Version")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some((name, value)) = extra_header {
        req = req.header(name, value);
    }
    let mut ready = send.clone().ready().await?;
    let (resp, mut body) = ready.send_request(req.body(()).expect("request"), false)?;
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let resp = resp.await?;
    if let Some(s) = resp.headers().get("grpc-status") {
        return Ok(s.to_str().unwrap_or("?").to_string());
    }
    let mut recv = resp.into_body();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv.trailers().await?.unwrap_or_default();
    Ok(trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_advertised_and_enforced() {
    let registry = Registry::start();
    let ctd = RuntimeBed::start(&registry);
    let daemon = Daemon::start(&ctd.endpoint(), &[], &[]);

    // SETTINGS_MAX_CONCURRENT_STREAMS: seen by a client once the server's SETTINGS are in.
    let io = tokio::net::UnixStream::connect(&daemon.cri_socket)
        .await
        .expect("connect");
    let (mut send, mut conn) = h2::client::handshake(io).await.expect("handshake");
    let status = {
        let call = raw_version(&mut send, None);
        tokio::pin!(call);
        tokio::select! {
            done = &mut call => done.expect("Version"),
            _ = &mut conn => panic!("connection closed"),
        }
    };
    assert_eq!(status, "0");
    assert_eq!(
        conn.max_concurrent_send_streams(),
        MAX_CONCURRENT_STREAMS as usize,
        "the proxy advertises its stream limit"
    );
    tokio::spawn(async move {
        let _ = conn.await;
    });

    // A header list over the limit: refused, and the connection keeps working.
    let mut send = raw_h2(&daemon.cri_socket).await;
    let huge = "x".repeat(MAX_HEADER_LIST_BYTES as usize + 1024);
    let refused = raw_version(&mut send, Some(("x-huge", huge))).await;
    assert!(
        !matches!(refused.as_deref(), Ok("0")),
        "a {} byte header list was accepted: {refused:?}",
        MAX_HEADER_LIST_BYTES + 1024
    );
    assert_eq!(
        raw_version(&mut send, None)
            .await
            .expect("Version after the refusal"),
        "0",
        "the connection survives a refused header list"
    );

    // A decided call over its cap: ResourceExhausted naming the cap, before the runtime sees it.
    let annotations: HashMap<String, String> = (0..(MAX_REQUEST_BYTES / 1000 + 10))
        .map(|i| (format!("example.com/a-{i}"), "v".repeat(1000)))
        .collect();
    let mut rt = runtime_client(&daemon.cri_socket).await;
    let mut direct = runtime_client(&ctd.socket).await;
    let mut config = container_config("big", "docker.io/library/absent:never");
    config.annotations = annotations.clone();
    let err = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: "none".into(),
            config: Some(config),
            sandbox_config: None,
        })
        .await
        .expect_err("a request over the cap");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains(&MAX_REQUEST_BYTES.to_string()),
        "the message names the cap: {}",
        err.message()
    );
    // A forwarded call of the same size is the runtime's to judge, as it is directly.
    let list = || ListContainersRequest {
        filter: Some(ContainerFilter {
            label_selector: annotations.clone(),
            ..Default::default()
        }),
    };
    let plain = |r: Result<tonic::Response<k8s_cri::v1::ListContainersResponse>, tonic::Status>| {
        r.map(|r| r.into_inner()).map_err(|e| e.code())
    };
    assert_eq!(
        plain(rt.list_containers(list()).await),
        plain(direct.list_containers(list()).await)
    );
    // The connection that carried the refused call still works.
    rt.version(VersionRequest::default())
        .await
        .expect("Version after the refused call");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_outliving_the_drain_grace_is_cut_and_the_daemon_exits() {
    let registry = Registry::start();
    push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let mut daemon = Daemon::start_with_config(
        &ctd.endpoint(),
        &[&registry.addr],
        &[],
        "drain_timeout_secs = 1\n",
    );
    let logs = tempfile::tempdir().expect("log dir");
    let (rt, ctr) = start_sleeping_container(
        &daemon.cri_socket,
        &registry.image_ref("app:v1"),
        "grace",
        logs.path(),
    )
    .await;

    // An exec of 60 s is in flight when SIGTERM arrives; the grace is 1 s.
    let mut in_flight = rt.clone();
    let call = tokio::spawn(async move {
        in_flight
            .exec_sync(ExecSyncRequest {
                container_id: ctr,
                cmd: vec!["/bin/sleep".into(), "60".into()],
                timeout: 120,
            })
            .await
    });
    // Wait until the exec runs in the container (its sleep shows up under the bed).
    let mut running = false;
    for _ in 0..100 {
        if processes_mentioning_cmd("/bin/sleep 60") {
            running = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(running, "the exec did not start");
    common::daemon::signal(daemon.pid().expect("daemon pid"), "TERM");
    let status = daemon.stop_after_signal();
    assert!(status.success(), "exit status {status}");
    let cut = call.await.expect("task");
    assert!(
        cut.is_err(),
        "the call outliving the grace was cut: {cut:?}"
    );
}

/// Whether a process whose command line contains `needle` runs.
fn processes_mentioning_cmd(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .any(|c| c.trim_end() == needle)
}
