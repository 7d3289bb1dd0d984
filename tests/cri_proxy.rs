//! The CRI proxy is transparent: a real client sequence through imagestream against real
//! containerd sees what it sees against containerd directly — pod and container lifecycle,
//! exec, logs, stats, images, the server-streaming `GetContainerEvents`, and methods the proxy
//! knows nothing about — and a runtime that goes away yields `Unavailable` naming it, until it
//! comes back.

mod common;

use common::daemon::Daemon;
use common::mirror::metric_value;
use common::*;
use k8s_cri::v1::{
    ContainerState, ContainerStatsRequest, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, GetEventsRequest, ImageStatusRequest, ListImagesRequest,
    ListPodSandboxRequest, PullImageRequest, RemoveContainerRequest, RemoveImageRequest,
    StartContainerRequest, StopContainerRequest, VersionRequest,
};
use std::time::{Duration, Instant};
use tonic::Code;

/// Calls `path` with a raw `VersionRequest` body, as a client with newer bindings would.
async fn raw_version_call(
    socket: &std::path::Path,
    path: &'static str,
) -> Result<String, tonic::Status> {
    let channel = cri_channel(socket).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<VersionRequest, k8s_cri::v1::VersionResponse>::default();
    let resp = grpc
        .unary(
            tonic::Request::new(VersionRequest::default()),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await?;
    Ok(resp.into_inner().runtime_api_version)
}

/// A codec that passes message bytes through, for calling methods we have no bindings for.
#[derive(Default, Clone)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len)))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Opens a server-streaming call with an empty request message.
async fn raw_server_stream(
    socket: &std::path::Path,
    path: &'static str,
) -> tonic::Streaming<bytes::Bytes> {
    let channel = cri_channel(socket).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    grpc.server_streaming(
        tonic::Request::new(bytes::Bytes::new()),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect("open server stream")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_sequence_through_the_proxy_matches_containerd() {
    let registry = Registry::start();
    push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    let logs = tempfile::tempdir().expect("log dir");

    let mut rt = runtime_client(&daemon.cri_socket).await;
    let mut img = image_client(&daemon.cri_socket).await;
    let mut direct_rt = runtime_client(&ctd.socket).await;
    let mut direct_img = image_client(&ctd.socket).await;

    // Version: the same answer.
    let via = rt
        .version(VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    let direct = direct_rt
        .version(VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(via, direct);

    // Server streaming. containerd 1.6 does not implement GetContainerEvents (the same error
    // both ways), so a server-streaming method with data is containerd's own event Subscribe,
    // served on the same socket. containerd 2 and CRI-O stream CRI container events. gRPC-go
    // sends a stream's headers with its first message: open it in the background; it must
    // deliver an event of the pod and container started below.
    let first_event = if ctd.kind == RuntimeKind::Containerd16 {
        let via = rt
            .get_container_events(GetEventsRequest::default())
            .await
            .map(|_| ())
            .map_err(|e| (e.code(), e.message().to_string()));
        let direct = direct_rt
            .get_container_events(GetEventsRequest::default())
            .await
            .map(|_| ())
            .map_err(|e| (e.code(), e.message().to_string()));
        assert_eq!(via, direct);
        let socket = daemon.cri_socket.clone();
        tokio::spawn(async move {
            let mut events =
                raw_server_stream(&socket, "/containerd.services.events.v1.Events/Subscribe").await;
            events.message().await.map(|m| m.map(|b| b.len()))
        })
    } else {
        let mut events_rt = runtime_client(&daemon.cri_socket).await;
        tokio::spawn(async move {
            let mut events = events_rt
                .get_container_events(GetEventsRequest::default())
                .await?
                .into_inner();
            events
                .message()
                .await
                .map(|m| m.map(|e| prost::Message::encoded_len(&e)))
        })
    };

    // Images.
    let app = registry.image_ref("app:v1");
    let image_ref = img
        .pull_image(PullImageRequest {
            image: Some(image_spec(&app)),
            ..Default::default()
        })
        .await
        .expect("PullImage")
        .into_inner()
        .image_ref;
    let status = direct_img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&app)),
            verbose: false,
        })
        .await
        .expect("ImageStatus direct")
        .into_inner();
    // PullImage's image_ref names the pulled image (containerd: its id; CRI-O: repo@digest).
    let by_ref = direct_img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&image_ref)),
            verbose: false,
        })
        .await
        .expect("ImageStatus of the image_ref direct")
        .into_inner();
    assert!(status.image.is_some());
    assert_eq!(status.image.map(|i| i.id), by_ref.image.map(|i| i.id));
    let via_status = img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&app)),
            verbose: true,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    let direct_status = direct_img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&app)),
            verbose: true,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert_eq!(via_status, direct_status);
    let mut via_list = img
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    let mut direct_list = direct_img
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    via_list.sort_by(|a, b| a.id.cmp(&b.id));
    direct_list.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(via_list, direct_list);

    // Pod and container lifecycle with host networking.
    let pod = pod_config("proxy-pod", "default", logs.path());
    let pod_id = run_pod(&mut rt, &pod).await;
    let cfg = container_config_with_command(
        "app",
        &image_ref,
        &[
            "/bin/sh",
            "-c",
            "echo hello-from-app; exec /bin/sleep infinity",
        ],
    );
    let ctr_id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(cfg),
            sandbox_config: Some(pod.clone()),
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
    let exec = rt
        .exec_sync(ExecSyncRequest {
            container_id: ctr_id.clone(),
            cmd: vec!["cat".into(), "/version".into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(exec.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "v1\n");
    let st = rt
        .container_status(ContainerStatusRequest {
            container_id: ctr_id.clone(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(st.state, ContainerState::ContainerRunning as i32);
    let direct_st = direct_rt
        .container_status(ContainerStatusRequest {
            container_id: ctr_id.clone(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus direct")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(st.id, direct_st.id);
    assert_eq!(st.image_ref, direct_st.image_ref);
    // Logs: the container's stdout lands in the log file the runtime was told to write.
    let log_path = logs.path().join("app.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("hello-from-app")
    {
        assert!(
            Instant::now() < deadline,
            "container log never showed its output"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = rt
        .container_stats(ContainerStatsRequest {
            container_id: ctr_id.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner();
    assert!(stats.stats.is_some());
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(pods.iter().any(|p| p.id == pod_id));

    // The event stream delivered the runtime's events (image pull, container start) as they happened.
    let event = tokio::time::timeout(Duration::from_secs(10), first_event)
        .await
        .expect("an event within 10 s")
        .expect("event task")
        .expect("event stream healthy")
        .expect("an event");
    assert!(event > 0);

    rt.stop_container(StopContainerRequest {
        container_id: ctr_id.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer");
    rt.remove_container(RemoveContainerRequest {
        container_id: ctr_id,
    })
    .await
    .expect("RemoveContainer");
    remove_pod(&mut rt, &pod_id).await;
    img.remove_image(RemoveImageRequest {
        image: Some(image_spec(&app)),
    })
    .await
    .expect("RemoveImage");
    let gone = direct_img
        .image_status(ImageStatusRequest {
            image: Some(image_spec(&app)),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(
        gone.image.is_none(),
        "image still present after RemoveImage through the proxy"
    );

    // Errors come back unchanged: a bad container id.
    let via_err = rt
        .container_status(ContainerStatusRequest {
            container_id: "nope".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown id");
    let direct_err = direct_rt
        .container_status(ContainerStatusRequest {
            container_id: "nope".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown id");
    assert_eq!(via_err.code(), direct_err.code());
    assert_eq!(via_err.message(), direct_err.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn methods_unknown_to_the_proxy_are_forwarded() {
    let registry = Registry::start();
    let ctd = RuntimeBed::start(&registry);
    let daemon = Daemon::start(&ctd.endpoint(), &[], &[]);

    // A whole service the proxy has no bindings for: containerd 1.6 still serves v1alpha2 (the
    // answer comes through), containerd 2 and CRI-O do not (their error comes through).
    let via = raw_version_call(
        &daemon.cri_socket,
        "/runtime.v1alpha2.RuntimeService/Version",
    )
    .await;
    let direct = raw_version_call(&ctd.socket, "/runtime.v1alpha2.RuntimeService/Version").await;
    assert_eq!(
        via.as_ref()
            .map_err(|e| (e.code(), e.message().to_string())),
        direct
            .as_ref()
            .map_err(|e| (e.code(), e.message().to_string()))
    );
    if ctd.kind == RuntimeKind::Containerd16 {
        assert_eq!(via.expect("v1alpha2 Version through the proxy"), "v1alpha2");
    }

    // A method newer than anything: the runtime's own answer comes back, not the proxy's.
    let via = raw_version_call(
        &daemon.cri_socket,
        "/runtime.v1.RuntimeService/SomeFutureMethod",
    )
    .await
    .expect_err("unknown method");
    let direct = raw_version_call(&ctd.socket, "/runtime.v1.RuntimeService/SomeFutureMethod")
        .await
        .expect_err("unknown method");
    assert_eq!(via.code(), direct.code());
    assert_eq!(via.message(), direct.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_down_is_unavailable_naming_it_and_recovers() {
    let registry = Registry::start();
    let mut ctd = RuntimeBed::start(&registry);
    let daemon = Daemon::start(&ctd.endpoint(), &[], &[]);
    let mut rt = runtime_client(&daemon.cri_socket).await;
    let mut img = image_client(&daemon.cri_socket).await;
    rt.version(VersionRequest::default())
        .await
        .expect("Version while up");

    ctd.stop();
    let err = rt
        .version(VersionRequest::default())
        .await
        .expect_err("runtime is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&ctd.endpoint()),
        "message does not name the endpoint: {}",
        err.message()
    );
    // A rewritten call fails the same way.
    let err = img
        .image_status(ImageStatusRequest {
            image: Some(image_spec("busybox:1")),
            verbose: false,
        })
        .await
        .expect_err("runtime is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&ctd.endpoint()), "{}", err.message());

    ctd.start_again();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match rt.version(VersionRequest::default()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "runtime back but proxy still fails: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    img.list_images(ListImagesRequest::default())
        .await
        .expect("ListImages after the runtime is back");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let registry = Registry::start();
    push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let mut daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    let logs = tempfile::tempdir().expect("log dir");
    let (rt, ctr) = start_sleeping_container(
        &daemon.cri_socket,
        &registry.image_ref("app:v1"),
        "drain",
        logs.path(),
    )
    .await;

    // A call that takes 2 s is in flight when SIGTERM arrives: it completes, then the daemon exits 0.
    let mut in_flight = rt.clone();
    let call = tokio::spawn(async move {
        in_flight
            .exec_sync(ExecSyncRequest {
                container_id: ctr,
                cmd: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "sleep 2; echo finished".into(),
                ],
                timeout: 30,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = daemon.pid().expect("daemon pid");
    common::daemon::signal(pid, "TERM");
    let out = call
        .await
        .expect("task")
        .expect("in-flight ExecSync completed through the drain")
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "finished\n");
    let status = daemon.stop_after_signal();
    assert!(status.success(), "exit status {status}");
}

/// Requests far larger than HTTP/2's default windows, decided (one of the four calls the proxy
/// decides on, collected whole) or forwarded as a stream, and many calls at once on one
/// connection: the same answers as containerd gives directly.
#[tokio::test(flavor = "multi_thread")]
async fn large_and_concurrent_requests_match_containerd() {
    let registry = Registry::start();
    let ctd = RuntimeBed::start(&registry);
    let daemon = Daemon::start(&ctd.endpoint(), &[], &[]);
    let big: std::collections::HashMap<String, String> = (0..3000)
        .map(|i| (format!("example.com/annotation-{i}"), "v".repeat(100)))
        .collect();
    let remove = || RemoveImageRequest {
        image: Some(k8s_cri::v1::ImageSpec {
            image: "docker.io/library/absent:never".into(),
            annotations: big.clone(),
            ..Default::default()
        }),
    };
    let list = || k8s_cri::v1::ListContainersRequest {
        filter: Some(k8s_cri::v1::ContainerFilter {
            label_selector: big.clone(),
            ..Default::default()
        }),
    };
    fn same<T: PartialEq + std::fmt::Debug>(
        via: Result<tonic::Response<T>, tonic::Status>,
        direct: Result<tonic::Response<T>, tonic::Status>,
        what: &str,
    ) {
        let plain = |r: Result<tonic::Response<T>, tonic::Status>| {
            r.map(|r| r.into_inner())
                .map_err(|e| (e.code(), e.message().to_string()))
        };
        assert_eq!(plain(via), plain(direct), "{what}");
    }
    for round in 0..3 {
        let (mut via, mut direct) = (
            image_client(&daemon.cri_socket).await,
            image_client(&ctd.socket).await,
        );
        same(
            via.remove_image(remove()).await,
            direct.remove_image(remove()).await,
            &format!("RemoveImage of a 300 KB request, round {round}"),
        );
        let (mut via, mut direct) = (
            runtime_client(&daemon.cri_socket).await,
            runtime_client(&ctd.socket).await,
        );
        same(
            via.list_containers(list()).await,
            direct.list_containers(list()).await,
            &format!("ListContainers of a 300 KB request, round {round}"),
        );
    }

    // 200 calls at once on one connection, a mix of decided and forwarded ones.
    let img = image_client(&daemon.cri_socket).await;
    let rt = runtime_client(&daemon.cri_socket).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (mut img, mut rt) = (img.clone(), rt.clone());
        calls.spawn(async move {
            if i % 2 == 0 {
                img.image_status(ImageStatusRequest {
                    image: Some(image_spec(&format!("docker.io/library/absent:{i}"))),
                    verbose: false,
                })
                .await
                .map(|r| assert!(r.into_inner().image.is_none()))
            } else {
                rt.version(VersionRequest::default()).await.map(|_| ())
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("task").expect("call through the proxy");
    }

    // Every call is counted, by method and status: forwarded ones from the runtime's trailers,
    // decided ones from the proxy's own answer.
    let metrics = daemon.metrics();
    let count = |labels: &str| {
        metric_value(
            &metrics,
            &format!("imagestream_cri_calls_total{{{labels}}}"),
        )
        .unwrap_or_else(|| panic!("no calls with {labels} in /metrics:\n{metrics}"))
    };
    assert!(count(r#"method="Version",code="OK""#) >= 100.0);
    assert!(count(r#"method="ImageStatus",code="OK""#) >= 100.0);
    assert!(count(r#"method="ListContainers",code="OK""#) >= 3.0);
}
