//! Bytes from a CRI client, as they arrive on the CRI socket: an HTTP/2 connection (preface,
//! frames, HPACK) served by the real transport ([`imagestream::cri::transport`], hyper on
//! `h2`) over an in-memory duplex, with the decider behind it resolving against a small
//! snapshot. The runtime is a socket that does not exist, so forwarded calls and the decider's
//! own runtime calls answer `Unavailable`. Seeds (fuzz/corpus/cri_connection) are curl's bytes
//! for a stream reference's ImageStatus and PullImage and a plain Version call.
//! Properties: no panic, and the connection ends once the client's bytes have.
#![no_main]

#[path = "common.rs"]
mod common;

use imagestream::cri::policy::PullPolicy;
use imagestream::cri::{CriProxy, CriService, Runtime};
use imagestream::stream::reference::DEFAULT_STREAM_HOST;
use imagestream::stream::resolve::View;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a connection may take once the client's bytes are in (h2's timers are not involved,
/// so a connection that outlives this is stuck).
const CONNECTION_LIMIT: Duration = Duration::from_secs(5);

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
}

fuzz_target!(|data: &[u8]| {
    RT.with(|rt| {
        rt.block_on(async {
            let runtime = Runtime::new("unix:///nonexistent/imagestream-fuzz/runtime.sock")
                .expect("endpoint");
            let proxy = CriProxy::new(
                runtime.clone(),
                View::new(common::snapshot()),
                DEFAULT_STREAM_HOST.to_string(),
                PullPolicy::new(&[], false, false),
            );
            let service = CriService::new(Arc::new(proxy), runtime);
            let (mut client, server) = tokio::io::duplex(64 << 10);
            let conn = tokio::spawn(imagestream::cri::transport::serve_connection(server, service));
            let input = data.to_vec();
            let talk = async move {
                let _ = client.write_all(&input).await;
                let _ = client.shutdown().await;
                // Read whatever the server answers until it closes.
                let mut sink = vec![0u8; 16 << 10];
                while let Ok(n) = client.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let done = tokio::time::timeout(CONNECTION_LIMIT, async {
                talk.await;
                let _ = conn.await;
            })
            .await;
            assert!(done.is_ok(), "connection did not end {CONNECTION_LIMIT:?} after the client's bytes");
        })
    });
});
