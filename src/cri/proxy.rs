//! The CRI request router. Four methods carry image references that may name stream tags and
//! are decoded, rewritten and re-sent as typed calls: `ImageService/PullImage`, `ImageStatus`,
//! `RemoveImage` and `RuntimeService/CreateContainer`. Every other request, whatever its path,
//! streaming or not, and including methods newer than our CRI bindings, is forwarded to the
//! runtime as raw HTTP/2 (headers, message frames and trailers untouched).

use super::policy::PullPolicy;
use super::upstream::Upstream;
use crate::registry::MAX_REFERENCE_LEN;
use crate::stream::reference::{is_image_id, TagRef};
use crate::stream::resolve::{resolve, Resolution, ResolveError, View};
use bytes::Bytes;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CreateContainerRequest, CreateContainerResponse, ImageSpec, ImageStatusRequest,
    ImageStatusResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use std::future::Future;
use std::sync::Arc;
use tonic::body::Body;
use tonic::{Request, Response, Status};
use tower::ServiceExt;
use tracing::Instrument;

pub const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
pub const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
pub const REMOVE_IMAGE: &str = "/runtime.v1.ImageService/RemoveImage";
pub const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";

/// The unary methods of CRI v1 (every method but the server-streaming `GetContainerEvents`).
/// Their request is one small message: the proxy collects it before forwarding, so that the
/// runtime receives headers and message in one write and wakes once. Anything else (streams,
/// methods newer than this list) is forwarded frame by frame as it arrives.
const UNARY_METHODS: &[&str] = &[
    "/runtime.v1.RuntimeService/Version",
    "/runtime.v1.RuntimeService/RunPodSandbox",
    "/runtime.v1.RuntimeService/StopPodSandbox",
    "/runtime.v1.RuntimeService/RemovePodSandbox",
    "/runtime.v1.RuntimeService/PodSandboxStatus",
    "/runtime.v1.RuntimeService/ListPodSandbox",
    "/runtime.v1.RuntimeService/StartContainer",
    "/runtime.v1.RuntimeService/StopContainer",
    "/runtime.v1.RuntimeService/RemoveContainer",
    "/runtime.v1.RuntimeService/ListContainers",
    "/runtime.v1.RuntimeService/ContainerStatus",
    "/runtime.v1.RuntimeService/UpdateContainerResources",
    "/runtime.v1.RuntimeService/ReopenContainerLog",
    "/runtime.v1.RuntimeService/ExecSync",
    "/runtime.v1.RuntimeService/Exec",
    "/runtime.v1.RuntimeService/Attach",
    "/runtime.v1.RuntimeService/PortForward",
    "/runtime.v1.RuntimeService/ContainerStats",
    "/runtime.v1.RuntimeService/ListContainerStats",
    "/runtime.v1.RuntimeService/PodSandboxStats",
    "/runtime.v1.RuntimeService/ListPodSandboxStats",
    "/runtime.v1.RuntimeService/UpdateRuntimeConfig",
    "/runtime.v1.RuntimeService/Status",
    "/runtime.v1.RuntimeService/CheckpointContainer",
    "/runtime.v1.RuntimeService/ListMetricDescriptors",
    "/runtime.v1.RuntimeService/ListPodSandboxMetrics",
    "/runtime.v1.RuntimeService/RuntimeConfig",
    "/runtime.v1.ImageService/ListImages",
    "/runtime.v1.ImageService/ImageFsInfo",
];

/// Largest CRI message accepted or sent on the rewritten calls (the kubelet's own limit).
pub const MAX_CRI_MESSAGE_BYTES: usize = 16 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Resolution errors as the kubelet sees them.
impl From<ResolveError> for Status {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Reference(_) => {
                crate::audit::status(tonic::Code::InvalidArgument, e.to_string())
            }
            ResolveError::UnknownStream { .. } | ResolveError::UnknownTag { .. } => {
                crate::audit::status(tonic::Code::NotFound, e.to_string())
            }
            ResolveError::Denied { .. } => {
                crate::audit::status(tonic::Code::PermissionDenied, e.to_string())
            }
        }
    }
}

pub struct CriProxy {
    upstream: Upstream,
    view: View,
    stream_host: String,
    policy: PullPolicy,
}

impl CriProxy {
    pub fn new(upstream: Upstream, view: View, stream_host: String, policy: PullPolicy) -> Self {
        Self {
            upstream,
            view,
            stream_host,
            policy,
        }
    }

    /// Handles one HTTP/2 request from a CRI client.
    pub async fn handle<B>(self: Arc<Self>, req: http::Request<B>) -> http::Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        match req.uri().path() {
            PULL_IMAGE => unary(req, move |r| self.clone().pull_image(r)).await,
            IMAGE_STATUS => unary(req, move |r| self.clone().image_status(r)).await,
            REMOVE_IMAGE => unary(req, move |r| self.clone().remove_image(r)).await,
            CREATE_CONTAINER => unary(req, move |r| self.clone().create_container(r)).await,
            _ => self.forward(req).await,
        }
    }

    async fn forward<B>(&self, req: http::Request<B>) -> http::Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let (parts, body) = req.into_parts();
        let body = if UNARY_METHODS.contains(&parts.uri.path()) {
            // gRPC framing adds 5 bytes to the message.
            match http_body_util::BodyExt::collect(http_body_util::Limited::new(
                body,
                MAX_CRI_MESSAGE_BYTES + 5,
            ))
            .await
            {
                Ok(collected) => Body::new(http_body_util::Full::new(collected.to_bytes())),
                Err(e) => {
                    return crate::audit::status(
                        tonic::Code::ResourceExhausted,
                        format!("request to {} not forwarded: {e}", parts.uri.path()),
                    )
                    .into_http()
                }
            }
        } else {
            Body::new(body)
        };
        let req = http::Request::from_parts(parts, body);
        match self.upstream.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    fn images(&self) -> ImageServiceClient<Upstream> {
        ImageServiceClient::new(self.upstream.clone())
            .max_decoding_message_size(MAX_CRI_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CRI_MESSAGE_BYTES)
    }

    fn runtime(&self) -> RuntimeServiceClient<Upstream> {
        RuntimeServiceClient::new(self.upstream.clone())
            .max_decoding_message_size(MAX_CRI_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CRI_MESSAGE_BYTES)
    }

    fn resolve(&self, reference: &str, namespace: Option<&str>) -> Result<Resolution, Status> {
        let mut spec = ImageSpec {
            image: reference.to_string(),
            ..Default::default()
        };
        self.rewrite(&mut spec, namespace)
    }

    /// For RemoveImage, which carries no namespace: a stream reference that names no stream tag
    /// (or a short name that needs a namespace) is simply not there. Returns whether to forward.
    fn rewrite_or_absent(&self, spec: &mut ImageSpec) -> Result<bool, Status> {
        match self.rewrite(spec, None) {
            Ok(Resolution::NeedsNamespace { .. }) => Ok(false),
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::debug!(image = %spec.image, reason = %status.message(), "not present");
                Ok(false)
            }
            Err(status) => Err(status),
        }
    }

    /// Rewrites `spec` to the pinned reference of the stream tag it names, if it names one.
    /// Returns what happened, for the caller to decide on the short-name-without-namespace case.
    fn rewrite(&self, spec: &mut ImageSpec, namespace: Option<&str>) -> Result<Resolution, Status> {
        if spec.image.len() > MAX_REFERENCE_LEN {
            return Err(crate::audit::status(
                tonic::Code::InvalidArgument,
                format!(
                    "image reference {:?} is longer than {MAX_REFERENCE_LEN} characters",
                    spec.image
                ),
            ));
        }
        let resolution = match resolve(&self.view.load(), &self.stream_host, &spec.image, namespace)
        {
            Ok(r) => r,
            Err(e) => {
                if let ResolveError::Denied {
                    pod_namespace,
                    namespace,
                    name,
                    reference,
                } = &e
                {
                    crate::metrics::metrics().pull_denied("access", true);
                    tracing::warn!(
                        target: "imagestream::audit",
                        action = "deny",
                        pod_namespace = %pod_namespace,
                        stream = %format!("{namespace}/{name}"),
                        reference = %reference,
                        "stream use denied"
                    );
                }
                return Err(e.into());
            }
        };
        if let Resolution::Pinned(p) = &resolution {
            record(&p.tag, &p.digest);
            tracing::debug!(from = %spec.image, to = %p.reference, "rewrote stream reference");
            if spec.user_specified_image.is_empty() {
                spec.user_specified_image = std::mem::take(&mut spec.image);
            }
            spec.image = p.reference.clone();
        }
        Ok(resolution)
    }

    async fn pull_image(
        self: Arc<Self>,
        req: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let span = cri_span("PullImage");
        async move {
            let (metadata, _, mut msg) = req.into_parts();
            let namespace = pod_namespace(&msg.sandbox_config);
            let Some(spec) = msg.image.as_mut() else {
                return self.images().pull_image(Request::from_parts(metadata, Default::default(), msg)).await;
            };
            let original = spec.image.clone();
            let resolution = self.rewrite(spec, namespace.as_deref())?;
            self.policy.check(
                &spec.image,
                matches!(resolution, Resolution::Pinned(_)),
                namespace.as_deref(),
            )?;
            match resolution {
                Resolution::PassThrough => {}
                Resolution::NeedsNamespace { name, tag } => {
                    return Err(crate::audit::status(tonic::Code::InvalidArgument, format!(
                        "image {original:?} is a short name of image stream {name:?} and needs the pod's namespace (sandbox_config.metadata.namespace) to resolve; name the stream explicitly as {}/<namespace>/{name}:{tag}",
                        self.stream_host
                    )));
                }
                Resolution::Pinned(_) => {
                    // The runtime may hold the pinned digest already: answer without a pull.
                    let status = self
                        .images()
                        .image_status(Request::new(ImageStatusRequest {
                            image: Some(spec.clone()),
                            verbose: false,
                        }))
                        .await?
                        .into_inner();
                    if let Some(image) = status.image {
                        tracing::debug!(image_ref = %image.id, "pinned image already present");
                        return Ok(Response::new(PullImageResponse { image_ref: image.id }));
                    }
                }
            }
            self.images()
                .pull_image(Request::from_parts(metadata, Default::default(), msg))
                .await
        }
        .instrument(span)
        .await
    }

    async fn image_status(
        self: Arc<Self>,
        req: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let span = cri_span("ImageStatus");
        async move {
            let (metadata, _, mut msg) = req.into_parts();
            if let Some(spec) = msg.image.as_mut() {
                // A stream reference is never reported present: ImageStatus carries no namespace,
                // so "present" would let the kubelet skip PullImage and with it the stream's
                // access check. PullImage answers at once when the runtime holds the digest.
                match self.rewrite(spec, None) {
                    Ok(Resolution::PassThrough) => {}
                    Ok(Resolution::Pinned(_) | Resolution::NeedsNamespace { .. }) => {
                        return Ok(Response::new(ImageStatusResponse::default()))
                    }
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        return Ok(Response::new(ImageStatusResponse::default()))
                    }
                    Err(status) => return Err(status),
                }
            }
            self.images()
                .image_status(Request::from_parts(metadata, Default::default(), msg))
                .await
        }
        .instrument(span)
        .await
    }

    async fn remove_image(
        self: Arc<Self>,
        req: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let span = cri_span("RemoveImage");
        async move {
            let (metadata, _, mut msg) = req.into_parts();
            if let Some(spec) = msg.image.as_mut() {
                if !self.rewrite_or_absent(spec)? {
                    // Removing what is not there succeeds (CRI: RemoveImage is idempotent).
                    return Ok(Response::new(RemoveImageResponse::default()));
                }
            }
            self.images()
                .remove_image(Request::from_parts(metadata, Default::default(), msg))
                .await
        }
        .instrument(span)
        .await
    }

    async fn create_container(
        self: Arc<Self>,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let span = cri_span("CreateContainer");
        async move {
            let (metadata, _, mut msg) = req.into_parts();
            let namespace = pod_namespace(&msg.sandbox_config);
            if let Some(spec) = msg.config.as_mut().and_then(|c| c.image.as_mut()) {
                // The kubelet passes the pulled image id and keeps what the pod named in
                // `user_specified_image`: the access check applies to that too.
                if !spec.user_specified_image.is_empty() && namespace.is_some() {
                    let used = self.resolve(&spec.user_specified_image, namespace.as_deref())?;
                    if let Resolution::PassThrough = used {
                        self.policy
                            .check(&spec.user_specified_image, false, namespace.as_deref())?;
                    }
                }
                let original = spec.image.clone();
                let resolution = self.rewrite(spec, namespace.as_deref())?;
                if !is_image_id(&spec.image) {
                    self.policy.check(
                        &spec.image,
                        matches!(resolution, Resolution::Pinned(_)),
                        namespace.as_deref(),
                    )?;
                }
                if let Resolution::NeedsNamespace { .. } = resolution {
                    return Err(crate::audit::status(tonic::Code::InvalidArgument, format!(
                        "image {original:?} is a short name of an image stream and needs the pod's namespace (sandbox_config.metadata.namespace) to resolve"
                    )));
                }
            }
            self.runtime()
                .create_container(Request::from_parts(metadata, Default::default(), msg))
                .await
        }
        .instrument(span)
        .await
    }
}

/// The pod's namespace, from the request's sandbox config.
fn pod_namespace(config: &Option<k8s_cri::v1::PodSandboxConfig>) -> Option<String> {
    config
        .as_ref()
        .and_then(|c| c.metadata.as_ref())
        .map(|m| m.namespace.clone())
}

fn cri_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "cri",
        method,
        stream = tracing::field::Empty,
        tag = tracing::field::Empty,
        digest = tracing::field::Empty
    )
}

fn record(tag: &TagRef, digest: &str) {
    let span = tracing::Span::current();
    span.record("stream", format!("{}/{}", tag.namespace, tag.name));
    span.record("tag", tag.tag.as_str());
    span.record("digest", digest);
}

/// A closure as a tonic unary service.
struct UnaryFn<F>(F);

impl<Req, Resp, F, Fut> tonic::server::UnaryService<Req> for UnaryFn<F>
where
    F: FnMut(Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future = Fut;

    fn call(&mut self, request: Request<Req>) -> Fut {
        (self.0)(request)
    }
}

/// Decodes a unary request of type `Req`, runs `f`, encodes its answer or status.
async fn unary<Req, Resp, B, F, Fut>(req: http::Request<B>, f: F) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
    F: FnMut(Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    let codec = tonic_prost::ProstCodec::<Resp, Req>::default();
    let mut grpc = tonic::server::Grpc::new(codec)
        .max_decoding_message_size(MAX_CRI_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_CRI_MESSAGE_BYTES);
    grpc.unary(UnaryFn(f), req).await
}
