//! The decider: what becomes of a CRI call that may carry a stream reference. Four methods
//! carry image references that may name stream tags: `ImageService/PullImage`, `ImageStatus`,
//! `RemoveImage` and `RuntimeService/CreateContainer`. [`CriProxy::decide`] takes one of them
//! ([`Method`]) and its request message (protobuf bytes) and returns a [`Decision`]: forward
//! the request as received, forward a rewritten message (the reference pinned), answer it here
//! (a stream reference that is absent, a pinned image the runtime already holds), or refuse
//! it with a gRPC status. No HTTP/2 here: the transport ([`super::transport`]) collects the
//! request, asks, and carries the decision out. The runtime calls a decision needs (the
//! `ImageStatus` behind a held digest, a private image's pull) go through [`Runtime::unary`].

use super::policy::PullPolicy;
use super::runtime::Runtime;
use crate::registry::MAX_REFERENCE_LEN;
use crate::stream::reference::{is_image_id, TagRef};
use crate::stream::resolve::{resolve, Resolution, ResolveError, View};
use bytes::Bytes;
use k8s_cri::v1::{
    CreateContainerRequest, ImageSpec, ImageStatusRequest, ImageStatusResponse, PullImageRequest,
    PullImageResponse, RemoveImageRequest, RemoveImageResponse,
};
use prost::Message;
use std::sync::Arc;
use tonic::Status;
use tracing::Instrument;

pub const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
pub const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
pub const REMOVE_IMAGE: &str = "/runtime.v1.ImageService/RemoveImage";
pub const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";

/// The four CRI methods whose requests may carry a stream reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    PullImage,
    ImageStatus,
    RemoveImage,
    CreateContainer,
}

impl Method {
    /// The method a gRPC path calls, if it is one of the four (CRI v1 only: v1alpha2 is gone
    /// from the kubelet since 1.26, and such a call is forwarded untouched).
    pub fn from_path(path: &str) -> Option<Method> {
        match path {
            PULL_IMAGE => Some(Method::PullImage),
            IMAGE_STATUS => Some(Method::ImageStatus),
            REMOVE_IMAGE => Some(Method::RemoveImage),
            CREATE_CONTAINER => Some(Method::CreateContainer),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::PullImage => "PullImage",
            Method::ImageStatus => "ImageStatus",
            Method::RemoveImage => "RemoveImage",
            Method::CreateContainer => "CreateContainer",
        }
    }
}

/// What becomes of one of the four calls.
#[derive(Debug)]
pub enum Decision {
    /// Forward the request as received; the runtime's answer goes back untouched.
    Forward,
    /// Forward this request message (protobuf) instead: the reference was rewritten.
    Rewritten(Bytes),
    /// Answer with this message (protobuf) and status OK, without asking the runtime.
    Answer(Bytes),
    /// Answer with this status.
    Refuse(Status),
}

impl From<Result<Decision, Status>> for Decision {
    fn from(r: Result<Decision, Status>) -> Self {
        r.unwrap_or_else(Decision::Refuse)
    }
}

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
    runtime: Runtime,
    view: View,
    stream_host: String,
    policy: PullPolicy,
    private: Option<Arc<super::private::PrivateGate>>,
    /// How the runtime names a pulled image, learned from its first `Version` answer.
    image_ref_style: tokio::sync::OnceCell<ImageRefStyle>,
}

pub const VERSION: &str = "/runtime.v1.RuntimeService/Version";

/// What a runtime answers in `PullImageResponse.image_ref`: containerd the image id (the config
/// digest), CRI-O the pulled image as `repo@sha256:…`. The proxy's own answer for a pinned image
/// the runtime already holds imitates it, so that a client sees the same answer as directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageRefStyle {
    ImageId,
    RepoDigest,
}

impl ImageRefStyle {
    /// By the runtime's `Version.runtime_name` (`containerd`, `cri-o`, …).
    fn of_runtime(runtime_name: &str) -> Self {
        if runtime_name == "cri-o" {
            ImageRefStyle::RepoDigest
        } else {
            ImageRefStyle::ImageId
        }
    }

    /// The `image_ref` for `image`, held by the runtime, pulled as `pinned`
    /// (`registry/repo@sha256:…`).
    fn image_ref(self, image: &k8s_cri::v1::Image, pinned: &str) -> String {
        match self {
            ImageRefStyle::ImageId => image.id.clone(),
            ImageRefStyle::RepoDigest => pinned.to_string(),
        }
    }
}

impl CriProxy {
    pub fn new(runtime: Runtime, view: View, stream_host: String, policy: PullPolicy) -> Self {
        Self {
            runtime,
            view,
            stream_host,
            policy,
            private: None,
            image_ref_style: tokio::sync::OnceCell::new(),
        }
    }

    /// The runtime's [`ImageRefStyle`], asked once (a failed `Version` call is not remembered).
    async fn image_ref_style(&self) -> Result<ImageRefStyle, Status> {
        self.image_ref_style
            .get_or_try_init(|| async {
                let version: k8s_cri::v1::VersionResponse = self
                    .runtime
                    .unary(VERSION, &k8s_cri::v1::VersionRequest::default())
                    .await?;
                Ok(ImageRefStyle::of_runtime(&version.runtime_name))
            })
            .await
            .copied()
    }

    /// Keeps private images to pods with valid pull credentials (see [`super::private`]).
    pub fn with_private_gate(mut self, gate: Arc<super::private::PrivateGate>) -> Self {
        self.private = Some(gate);
        self
    }

    /// Decides on a complete request `message` (protobuf bytes) to `method`, in the call's
    /// span (stream, tag and digest recorded when a stream reference resolves).
    pub async fn decide(&self, method: Method, message: &[u8]) -> Decision {
        let span = cri_span(method.name());
        async move {
            match method {
                Method::PullImage => match decode(message) {
                    Ok(m) => self.pull_image(m).await.into(),
                    Err(s) => Decision::Refuse(s),
                },
                Method::ImageStatus => decode(message).and_then(|m| self.image_status(m)).into(),
                Method::RemoveImage => decode(message).and_then(|m| self.remove_image(m)).into(),
                Method::CreateContainer => decode(message)
                    .and_then(|m| self.create_container(m))
                    .into(),
            }
        }
        .instrument(span)
        .await
    }

    /// Refuses a stream reference whose pinned generation the stream's `enforce` signature
    /// policy does not let run (FailedPrecondition, naming the tag, generation, digest and why).
    fn signature_gate(resolution: &Resolution, call: &'static str) -> Result<(), Status> {
        let Resolution::Pinned(p) = resolution else {
            return Ok(());
        };
        let Some(why) = &p.refused else {
            return Ok(());
        };
        crate::metrics::metrics().signature_refused(call);
        tracing::warn!(
            target: "imagestream::audit",
            action = "refuse-unverified",
            stream = %format!("{}/{}", p.tag.namespace, p.tag.name),
            tag = %p.tag.tag,
            digest = %p.digest,
            generation = p.generation,
            call,
            reason = %why,
            "stream reference not run: its generation is not signature-verified"
        );
        Err(crate::audit::status(
            tonic::Code::FailedPrecondition,
            format!(
                "image stream tag {} is at generation {} ({}), which its signature policy (enforce) does not let run: {why}; `imagestream tag verify {}` checks it again",
                p.tag, p.generation, p.digest, p.tag
            ),
        ))
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

    async fn pull_image(&self, mut msg: PullImageRequest) -> Result<Decision, Status> {
        let namespace = pod_namespace(&msg.sandbox_config);
        let Some(spec) = msg.image.as_mut() else {
            return Ok(Decision::Forward);
        };
        let original = spec.image.clone();
        let resolution = self.rewrite(spec, namespace.as_deref())?;
        Self::signature_gate(&resolution, "PullImage")?;
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
            let pinned = spec.image.clone();
            let status: ImageStatusResponse = self
                .runtime
                .unary(
                    IMAGE_STATUS,
                    &ImageStatusRequest {
                        image: Some(spec),
                        verbose: false,
                    },
                )
                .await?;
            if let Some(image) = status.image {
                let image_ref = self.image_ref_style().await?.image_ref(&image, &pinned);
                tracing::debug!(%image_ref, "pinned image already present");
                if let Some((gate, repo, uid)) = &private {
                    gate.granted(uid.as_deref(), repo, &image.id);
                    if image_ref != image.id {
                        gate.granted(uid.as_deref(), repo, &image_ref);
                    }
                }
                return Ok(Decision::Answer(
                    PullImageResponse { image_ref }.encode_to_vec().into(),
                ));
            }
        }
        match private {
            // The answer's image id is needed for the grant: pull as a typed call.
            Some((gate, repo, uid)) => {
                let resp: PullImageResponse = self.runtime.unary(PULL_IMAGE, &msg).await?;
                gate.granted(uid.as_deref(), &repo, &resp.image_ref);
                Ok(Decision::Answer(resp.encode_to_vec().into()))
            }
            None if matches!(resolution, Resolution::Pinned(_)) => {
                Ok(Decision::Rewritten(msg.encode_to_vec().into()))
            }
            None => Ok(Decision::Forward),
        }
    }

    fn image_status(&self, mut msg: ImageStatusRequest) -> Result<Decision, Status> {
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
                Ok(absent())
            }
            Ok(Resolution::PassThrough) => Ok(Decision::Forward),
            Ok(Resolution::Pinned(_) | Resolution::NeedsNamespace { .. }) => Ok(absent()),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(absent()),
            Err(status) => Err(status),
        }
    }

    fn remove_image(&self, mut msg: RemoveImageRequest) -> Result<Decision, Status> {
        let Some(spec) = msg.image.as_mut() else {
            return Ok(Decision::Forward);
        };
        let original = spec.image.clone();
        if !self.rewrite_or_absent(spec)? {
            // Removing what is not there succeeds (CRI: RemoveImage is idempotent).
            return Ok(Decision::Answer(
                RemoveImageResponse::default().encode_to_vec().into(),
            ));
        }
        Ok(if spec.image == original {
            Decision::Forward
        } else {
            Decision::Rewritten(msg.encode_to_vec().into())
        })
    }

    fn create_container(&self, mut msg: CreateContainerRequest) -> Result<Decision, Status> {
        let namespace = pod_namespace(&msg.sandbox_config);
        let Some(spec) = msg.config.as_mut().and_then(|c| c.image.as_mut()) else {
            return Ok(Decision::Forward);
        };
        // The kubelet passes the pulled image id and keeps what the pod named in
        // `user_specified_image`: the access check applies to that too.
        if !spec.user_specified_image.is_empty() && namespace.is_some() {
            let used = self.resolve(&spec.user_specified_image, namespace.as_deref())?;
            Self::signature_gate(&used, "CreateContainer")?;
            if let Resolution::PassThrough = used {
                self.policy
                    .check(&spec.user_specified_image, false, namespace.as_deref())?;
            }
        }
        let original = spec.image.clone();
        let resolution = self.rewrite(spec, namespace.as_deref())?;
        Self::signature_gate(&resolution, "CreateContainer")?;
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
            Resolution::Pinned(_) => Ok(Decision::Rewritten(msg.encode_to_vec().into())),
            Resolution::PassThrough => Ok(Decision::Forward),
        }
    }
}

/// The answer for an image that is not there: an empty `ImageStatusResponse`.
fn absent() -> Decision {
    Decision::Answer(ImageStatusResponse::default().encode_to_vec().into())
}

/// The request message of a decided call.
fn decode<M: Message + Default>(message: &[u8]) -> Result<M, Status> {
    M::decode(message).map_err(|e| {
        crate::audit::status(
            tonic::Code::InvalidArgument,
            format!("cannot decode the request message: {e}"),
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_image_is_named_as_the_runtime_names_a_pull() {
        let image = k8s_cri::v1::Image {
            id: "sha256:c0ffee".into(),
            ..Default::default()
        };
        let pinned = "registry.example.com/app@sha256:feed";
        assert_eq!(
            ImageRefStyle::of_runtime("containerd").image_ref(&image, pinned),
            "sha256:c0ffee"
        );
        assert_eq!(
            ImageRefStyle::of_runtime("cri-o").image_ref(&image, pinned),
            pinned
        );
    }
}
