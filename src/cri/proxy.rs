//! The CRI request router. Four methods carry image references that may name stream tags:
//! `ImageService/PullImage`, `ImageStatus`, `RemoveImage` and `RuntimeService/CreateContainer`.
//! Their request is collected and decoded; the proxy then answers it itself (a stream reference
//! that is absent, a refusal, a pinned image the runtime already holds), or forwards it: as
//! received if nothing was rewritten, else re-encoded with the pinned reference. Either way the
//! request keeps its headers and the runtime's answer comes back untouched. Every other request,
//! whatever its path, streaming or not, and including methods newer than our CRI bindings, is
//! forwarded to the runtime as raw HTTP/2 (headers, message frames and trailers untouched).

use super::policy::PullPolicy;
use super::upstream::{decode_message, encode_message, RelayCalls, RequestBody, Upstream};
use crate::registry::MAX_REFERENCE_LEN;
use crate::stream::reference::{is_image_id, TagRef};
use crate::stream::resolve::{resolve, Resolution, ResolveError, View};
use bytes::Bytes;
use k8s_cri::v1::{
    CreateContainerRequest, ImageSpec, ImageStatusRequest, ImageStatusResponse, PullImageRequest,
    PullImageResponse, RemoveImageRequest, RemoveImageResponse,
};
use std::sync::Arc;
use std::time::Instant;
use tonic::body::Body;
use tonic::Status;
use tracing::Instrument;

pub const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
pub const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
pub const REMOVE_IMAGE: &str = "/runtime.v1.ImageService/RemoveImage";
pub const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";

/// A CRI v1 method known by name.
pub struct CriMethod {
    /// The gRPC path: `/runtime.v1.ImageService/ImageStatus`.
    pub path: &'static str,
    /// The method name (`ImageStatus`), its `method` label in the CRI call metrics. No two CRI
    /// services share a method name, so the service is left out.
    pub name: &'static str,
}

macro_rules! cri_methods {
    ($($service:literal $name:literal,)*) => {
        &[$(CriMethod {
            path: concat!("/runtime.v1.", $service, "/", $name),
            name: $name,
        },)*]
    };
}

/// The methods of CRI v1. Calls are counted by the last segment of their path (so that
/// `/runtime.v1alpha2.ImageService/ImageStatus` counts as `ImageStatus`); any path whose last
/// segment is none of these method names counts as method `other`.
pub const CRI_METHODS: &[CriMethod] = cri_methods![
    "RuntimeService" "Version",
    "RuntimeService" "RunPodSandbox",
    "RuntimeService" "StopPodSandbox",
    "RuntimeService" "RemovePodSandbox",
    "RuntimeService" "PodSandboxStatus",
    "RuntimeService" "ListPodSandbox",
    "RuntimeService" "CreateContainer",
    "RuntimeService" "StartContainer",
    "RuntimeService" "StopContainer",
    "RuntimeService" "RemoveContainer",
    "RuntimeService" "ListContainers",
    "RuntimeService" "ContainerStatus",
    "RuntimeService" "UpdateContainerResources",
    "RuntimeService" "ReopenContainerLog",
    "RuntimeService" "ExecSync",
    "RuntimeService" "Exec",
    "RuntimeService" "Attach",
    "RuntimeService" "PortForward",
    "RuntimeService" "ContainerStats",
    "RuntimeService" "ListContainerStats",
    "RuntimeService" "PodSandboxStats",
    "RuntimeService" "ListPodSandboxStats",
    "RuntimeService" "UpdateRuntimeConfig",
    "RuntimeService" "Status",
    "RuntimeService" "CheckpointContainer",
    "RuntimeService" "GetContainerEvents",
    "RuntimeService" "ListMetricDescriptors",
    "RuntimeService" "ListPodSandboxMetrics",
    "RuntimeService" "RuntimeConfig",
    "RuntimeService" "UpdatePodSandboxResources",
    "ImageService" "ListImages",
    "ImageService" "ImageStatus",
    "ImageService" "PullImage",
    "ImageService" "RemoveImage",
    "ImageService" "ImageFsInfo",
];

/// The index in [`CRI_METHODS`] of the method named by the last segment of `path`, or
/// `CRI_METHODS.len()` (method `other`).
pub fn method_index(path: &str) -> usize {
    let name = path.rsplit_once('/').map_or(path, |(_, name)| name);
    CRI_METHODS
        .iter()
        .position(|m| m.name == name)
        .unwrap_or(CRI_METHODS.len())
}

/// Largest CRI message accepted or sent on the rewritten calls (the kubelet's own limit).
pub const MAX_CRI_MESSAGE_BYTES: usize = 16 << 20;

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
    private: Option<Arc<super::private::PrivateGate>>,
}

impl CriProxy {
    pub fn new(upstream: Upstream, view: View, stream_host: String, policy: PullPolicy) -> Self {
        Self {
            upstream,
            view,
            stream_host,
            policy,
            private: None,
        }
    }

    /// Keeps private images to pods with valid pull credentials (see [`super::private`]).
    pub fn with_private_gate(mut self, gate: Arc<super::private::PrivateGate>) -> Self {
        self.private = Some(gate);
        self
    }

    /// The runtime connection the proxy's own calls use.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Decides on a complete request to one of the four methods that may carry a stream
    /// reference (`parts` and `body` as the client sent them): forward it as received, or
    /// answer it here (an answer made here, a refusal, or the runtime's answer to a rewritten
    /// request). Any other path is forwarded.
    /// `via` makes the runtime calls a decision needs on the client connection's own runtime
    /// connection, when the relay can.
    pub async fn decide(
        self: Arc<Self>,
        parts: http::request::Parts,
        body: Bytes,
        via: Option<RelayCalls>,
    ) -> Verdict {
        // The decision's future is boxed whole by the relay on every call: the paths that
        // wait on the network (a pull, a rewritten request, a registry check) are boxed where
        // they start, so that this future stays small for the calls that wait on nothing.
        match parts.uri.path() {
            PULL_IMAGE => Box::pin(self.pull(parts, body, via)).await,
            IMAGE_STATUS => self
                .rewritten(parts, body, via, "ImageStatus", Self::image_status)
                .await
                .into(),
            REMOVE_IMAGE => self
                .rewritten(parts, body, via, "RemoveImage", Self::remove_image)
                .await
                .into(),
            CREATE_CONTAINER => Box::pin(self.rewritten(
                parts,
                body,
                via,
                "CreateContainer",
                Self::create_container,
            ))
            .await
            .into(),
            _ => Verdict::Forward,
        }
    }

    /// PullImage: always answered here (see `decide`).
    async fn pull(
        self: &Arc<Self>,
        parts: http::request::Parts,
        body: Bytes,
        via: Option<RelayCalls>,
    ) -> Verdict {
        match self
            .rewritten(parts, body, via, "PullImage", Self::pull_image)
            .await
        {
            // A pull is answered through the proxy's own runtime connection, so that a
            // registry failure can be marked in its status (see `super::pull_errors`).
            Rewritten::Forward(parts, body) => Verdict::Respond(super::pull_errors::mark(
                self.upstream
                    .forward(parts, RequestBody::<Empty>::Full(body))
                    .await,
            )),
            Rewritten::Respond(resp) => Verdict::Respond(super::pull_errors::mark(resp)),
        }
    }

    /// One of the four calls that may carry a stream reference: decodes the request, lets
    /// `decide` look at it (in the call's span), then answers, refuses or forwards.
    async fn rewritten<Req, F>(
        self: &Arc<Self>,
        mut parts: http::request::Parts,
        body: Bytes,
        via: Option<RelayCalls>,
        method: &'static str,
        decide: F,
    ) -> Rewritten
    where
        Req: prost::Message + Default,
        F: AsyncFn(&Self, Req, Option<RelayCalls>) -> Result<Decision, Status>,
    {
        let span = cri_span(method);
        async move {
            let decision = match decode_message::<Req>(&body) {
                Ok(msg) => decide(self, msg, via).await,
                Err(status) => Err(status),
            };
            match decision {
                Ok(Decision::Forward) => Rewritten::Forward(parts, body),
                Ok(Decision::ForwardRewritten(body)) => {
                    // The message changed length; gRPC clients send no content-length, but
                    // one that did would now be wrong.
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    Rewritten::Respond(
                        Box::pin(
                            self.upstream
                                .forward(parts, RequestBody::<Empty>::Full(body)),
                        )
                        .await,
                    )
                }
                Ok(Decision::Answer(message)) => Rewritten::Respond(answer(message)),
                Err(status) => Rewritten::Respond(status.into_http()),
            }
        }
        .instrument(span)
        .await
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

    /// A unary runtime call, through the relay when it can make it.
    async fn runtime_unary<Req, Resp>(
        &self,
        via: Option<&RelayCalls>,
        path: &'static str,
        request: &Req,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        if let Some(via) = via {
            if let Some(answer) = via.unary(path, request).await {
                crate::metrics::metrics().relay_calls.inc();
                return answer;
            }
            crate::metrics::metrics().relay_call_fallbacks.inc();
        }
        self.upstream.unary(path, request).await
    }

    async fn pull_image(
        &self,
        mut msg: PullImageRequest,
        via: Option<RelayCalls>,
    ) -> Result<Decision, Status> {
        let namespace = pod_namespace(&msg.sandbox_config);
        let Some(spec) = msg.image.as_mut() else {
            return Ok(Decision::Forward);
        };
        let original = spec.image.clone();
        let resolution = self.rewrite(spec, namespace.as_deref())?;
        self.policy.check(
            &spec.image,
            matches!(resolution, Resolution::Pinned(_)),
            namespace.as_deref(),
        )?;
        if let Resolution::NeedsNamespace { name, tag } = &resolution {
            return Err(crate::audit::status(tonic::Code::InvalidArgument, format!(
                "image {original:?} is a short name of image stream {name:?} and needs the pod's namespace (sandbox_config.metadata.namespace) to resolve; name the stream explicitly as {}/<namespace>/{name}:{tag}",
                self.stream_host
            )));
        }
        let spec = spec.clone();
        // A private image needs the pod's credentials, verified, even when the runtime holds
        // it already; the pull then grants the pod the image (see `super::private`).
        let private = match &self.private {
            Some(gate) => {
                let auth = msg
                    .auth
                    .as_ref()
                    .and_then(super::private::PullAuth::from_cri);
                match gate.check_pull(&spec.image, auth.as_ref()).await? {
                    super::private::PullDecision::Private { repo } => {
                        Some((gate, repo, pod_uid(&msg.sandbox_config)))
                    }
                    super::private::PullDecision::Public => None,
                }
            }
            None => None,
        };
        if let Resolution::Pinned(_) = resolution {
            // The runtime may hold the pinned digest already: answer without a pull.
            let status: ImageStatusResponse = self
                .runtime_unary(
                    via.as_ref(),
                    IMAGE_STATUS,
                    &ImageStatusRequest {
                        image: Some(spec),
                        verbose: false,
                    },
                )
                .await?;
            if let Some(image) = status.image {
                tracing::debug!(image_ref = %image.id, "pinned image already present");
                if let Some((gate, repo, uid)) = &private {
                    gate.granted(uid.as_deref(), repo, &image.id);
                }
                return Ok(Decision::Answer(encode_message(&PullImageResponse {
                    image_ref: image.id,
                })));
            }
        }
        match private {
            // The answer's image id is needed for the grant: pull as a typed call.
            Some((gate, repo, uid)) => {
                let resp: PullImageResponse = self.upstream.unary(PULL_IMAGE, &msg).await?;
                gate.granted(uid.as_deref(), &repo, &resp.image_ref);
                Ok(Decision::Answer(encode_message(&resp)))
            }
            None if matches!(resolution, Resolution::Pinned(_)) => {
                Ok(Decision::ForwardRewritten(encode_message(&msg)))
            }
            None => Ok(Decision::Forward),
        }
    }

    async fn image_status(
        &self,
        mut msg: ImageStatusRequest,
        _via: Option<RelayCalls>,
    ) -> Result<Decision, Status> {
        let Some(spec) = msg.image.as_mut() else {
            return Ok(Decision::Forward);
        };
        // A stream reference is never reported present: ImageStatus carries no namespace, so
        // "present" would let the kubelet skip PullImage and with it the stream's access check.
        // PullImage answers at once when the runtime holds the digest.
        match self.rewrite(spec, None) {
            // A private image is never reported present either: the kubelet must pull it with
            // the pod's credentials (see `super::private`).
            Ok(Resolution::PassThrough)
                if self
                    .private
                    .as_ref()
                    .is_some_and(|g| g.hide_status(&spec.image)) =>
            {
                Ok(Decision::Answer(encode_message(
                    &ImageStatusResponse::default(),
                )))
            }
            Ok(Resolution::PassThrough) => Ok(Decision::Forward),
            Ok(Resolution::Pinned(_) | Resolution::NeedsNamespace { .. }) => Ok(Decision::Answer(
                encode_message(&ImageStatusResponse::default()),
            )),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(Decision::Answer(
                encode_message(&ImageStatusResponse::default()),
            )),
            Err(status) => Err(status),
        }
    }

    async fn remove_image(
        &self,
        mut msg: RemoveImageRequest,
        _via: Option<RelayCalls>,
    ) -> Result<Decision, Status> {
        let Some(spec) = msg.image.as_mut() else {
            return Ok(Decision::Forward);
        };
        let original = spec.image.clone();
        if !self.rewrite_or_absent(spec)? {
            // Removing what is not there succeeds (CRI: RemoveImage is idempotent).
            return Ok(Decision::Answer(encode_message(
                &RemoveImageResponse::default(),
            )));
        }
        Ok(if spec.image == original {
            Decision::Forward
        } else {
            Decision::ForwardRewritten(encode_message(&msg))
        })
    }

    async fn create_container(
        &self,
        mut msg: CreateContainerRequest,
        _via: Option<RelayCalls>,
    ) -> Result<Decision, Status> {
        let namespace = pod_namespace(&msg.sandbox_config);
        let Some(spec) = msg.config.as_mut().and_then(|c| c.image.as_mut()) else {
            return Ok(Decision::Forward);
        };
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
        if let Some(gate) = &self.private {
            let named = match self.resolve(&spec.user_specified_image, namespace.as_deref()) {
                Ok(Resolution::Pinned(p)) => p.reference,
                _ => spec.user_specified_image.clone(),
            };
            let image = spec.image.clone();
            gate.check_create(&[&image, &named], pod_uid(&msg.sandbox_config).as_deref())?;
        }
        match resolution {
            Resolution::NeedsNamespace { .. } => Err(crate::audit::status(tonic::Code::InvalidArgument, format!(
                "image {original:?} is a short name of an image stream and needs the pod's namespace (sandbox_config.metadata.namespace) to resolve"
            ))),
            Resolution::Pinned(_) => Ok(Decision::ForwardRewritten(encode_message(&msg))),
            Resolution::PassThrough => Ok(Decision::Forward),
        }
    }
}

/// What the proxy does with one of the four calls that may carry a stream reference.
enum Decision {
    /// Forward the request as received.
    Forward,
    /// Forward this request message (a gRPC frame) instead: the reference was rewritten.
    ForwardRewritten(Bytes),
    /// Answer with this message (a gRPC frame) without asking the runtime.
    Answer(Bytes),
}

/// What becomes of a request to one of the four methods (see [`CriProxy::decide`]).
pub enum Verdict {
    /// Forward the request to the runtime as received; its answer comes back untouched.
    Forward,
    /// Answer the client with this (made here, or the runtime's answer to a request the
    /// proxy sent itself).
    Respond(http::Response<Body>),
}

/// [`CriProxy::rewritten`]'s outcome: forward as received (`parts` and body kept for a caller
/// that forwards itself), or this answer.
enum Rewritten {
    Forward(http::request::Parts, Bytes),
    Respond(http::Response<Body>),
}

impl From<Rewritten> for Verdict {
    fn from(r: Rewritten) -> Self {
        match r {
            Rewritten::Forward(..) => Verdict::Forward,
            Rewritten::Respond(resp) => Verdict::Respond(resp),
        }
    }
}

type Empty = http_body_util::Empty<Bytes>;

/// A gRPC answer made here: `message` (a gRPC frame), then status OK in the trailers.
fn answer(message: Bytes) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(message)),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let mut resp = http::Response::new(Body::new(http_body_util::StreamBody::new(
        futures_util::stream::iter(frames),
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The pod's sandbox uid, from the request's sandbox config.
fn pod_uid(config: &Option<k8s_cri::v1::PodSandboxConfig>) -> Option<String> {
    config
        .as_ref()
        .and_then(|c| c.metadata.as_ref())
        .map(|m| m.uid.clone())
        .filter(|u| !u.is_empty())
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

/// One CRI call being answered, for the call metrics: recorded once, with the first status
/// seen, or as `Cancelled` if the call is dropped (client gone) before its status.
pub(crate) struct Call {
    /// Index in [`CRI_METHODS`]; `CRI_METHODS.len()` for any other path.
    method: usize,
    start: Instant,
    done: bool,
}

impl Call {
    pub(crate) fn start(path: &str) -> Self {
        Self {
            method: method_index(path),
            start: Instant::now(),
            done: false,
        }
    }

    pub(crate) fn finish(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            crate::metrics::metrics().cri_call(self.method, code, self.start.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The gRPC status in `headers` (response headers of a trailers-only answer, or trailers).
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get(GRPC_STATUS)
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// The gRPC status of an HTTP answer that carries none (not from a gRPC server), as gRPC
/// clients map it.
pub(crate) fn http_status_code(status: http::StatusCode) -> tonic::Code {
    match status.as_u16() {
        400 => tonic::Code::Internal,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::Unimplemented,
        429 | 502..=504 => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn trailers(code: &str) -> http::HeaderMap {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t
    }

    #[test]
    fn method_labels() {
        let name = |path| {
            CRI_METHODS
                .get(method_index(path))
                .map_or("other", |m| m.name)
        };
        assert_eq!(name(IMAGE_STATUS), "ImageStatus");
        assert_eq!(name(CREATE_CONTAINER), "CreateContainer");
        assert_eq!(
            name("/runtime.v1.RuntimeService/GetContainerEvents"),
            "GetContainerEvents"
        );
        assert_eq!(
            name("/runtime.v1alpha2.ImageService/ImageStatus"),
            "ImageStatus"
        );
        assert_eq!(name("/runtime.v1.RuntimeService/SomeFutureMethod"), "other");
        assert_eq!(name("/runtime.v1.ImageService/NoSuchMethod"), "other");
        assert_eq!(name("/grpc.health.v1.Health/Check"), "other");
        assert_eq!(name(""), "other");
        // Method names are unique, so unqualified labels are unambiguous.
        let mut names: Vec<_> = CRI_METHODS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CRI_METHODS.len());
    }

    #[test]
    fn status_codes() {
        assert_eq!(grpc_status(&trailers("0")), Some(tonic::Code::Ok));
        assert_eq!(grpc_status(&trailers("5")), Some(tonic::Code::NotFound));
        assert_eq!(grpc_status(&trailers("14")), Some(tonic::Code::Unavailable));
        assert_eq!(grpc_status(&trailers("99")), Some(tonic::Code::Unknown));
        assert_eq!(grpc_status(&http::HeaderMap::new()), None);
        assert_eq!(
            http_status_code(http::StatusCode::NOT_FOUND),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            http_status_code(http::StatusCode::SERVICE_UNAVAILABLE),
            tonic::Code::Unavailable
        );
        assert_eq!(
            http_status_code(http::StatusCode::IM_A_TEAPOT),
            tonic::Code::Unknown
        );
    }
}
