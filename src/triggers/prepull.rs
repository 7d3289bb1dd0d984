//! The built-in pre-pull trigger (`prepull = true`): when a tag's current image changes, ask
//! the runtime to pull it right away (CRI `PullImage` of the pinned `registry/repo@sha256:…`,
//! which goes through the node's mirror when containerd is configured for it), so that the next
//! pod start does not wait for a download. Outcomes are counted as trigger `prepull`.

use crate::cri::Runtime;
use crate::stream::model::StreamKey;
use crate::stream::resolve::View;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};
use tokio::sync::watch;

/// Pre-pulls each new current image of a tag into `runtime`, until `shutdown`.
pub async fn run(view: View, runtime: Runtime, mut shutdown: watch::Receiver<bool>) {
    let mut client = ImageServiceClient::new(runtime)
        .max_decoding_message_size(crate::cri::runtime::MAX_MESSAGE_BYTES);
    let mut events = view.events();
    loop {
        let e = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let e = match e {
            Ok(e) if e.new_digest.is_some() => e,
            Ok(_) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "pre-pull fell behind; those images are pulled on first use"
                );
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        // The event names the digest; the view has where it comes from.
        let reference = view
            .load()
            .get(&StreamKey::new(&e.namespace, &e.stream))
            .and_then(|s| s.tags.get(&e.tag))
            .and_then(|t| t.current())
            .filter(|g| Some(&g.digest) == e.new_digest.as_ref())
            .map(|g| g.reference.clone());
        let Some(reference) = reference else {
            continue; // moved again since; that event pulls
        };
        let started = std::time::Instant::now();
        let result = client
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.clone(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        crate::metrics::metrics()
            .trigger_runs
            .get_or_create(&crate::metrics::TriggerLabels {
                trigger: "prepull".into(),
                outcome: outcome.into(),
            })
            .inc();
        match result {
            Ok(_) => tracing::info!(
                tag = %format!("{}/{}:{}", e.namespace, e.stream, e.tag),
                digest = e.new_digest.as_deref().unwrap_or("-"),
                elapsed = ?started.elapsed(),
                "pre-pulled into the runtime"
            ),
            Err(err) => tracing::warn!(
                tag = %format!("{}/{}:{}", e.namespace, e.stream, e.tag),
                %reference,
                error = %err.message(),
                "pre-pull failed; the image is pulled on first use"
            ),
        }
    }
}
