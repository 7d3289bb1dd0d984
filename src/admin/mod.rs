//! The admin API (`imagestream.v1.Admin`, defined in `proto/`): one thin tonic adapter over the
//! [`StreamService`], where domain errors become gRPC statuses, plus the client the CLI uses.

pub mod client;

use crate::registry::RegistryError;
use crate::stream::model::{Generation, Stream, StreamKey, Tag};
use crate::stream::reference::TagRef;
use crate::stream::resolve::Resolution;
use crate::stream::service::{StreamError, StreamService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Generated types and service of `proto/imagestream/v1/admin.proto`.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("imagestream.v1");
}

use pb::admin_server::Admin;
pub use pb::admin_server::AdminServer;

impl From<StreamError> for Status {
    fn from(e: StreamError) -> Self {
        let message = e.to_string();
        match e {
            StreamError::Name(_) | StreamError::Reference(_) | StreamError::Source { .. } => {
                Status::invalid_argument(message)
            }
            StreamError::StreamNotFound(_) | StreamError::TagNotFound { .. } => {
                Status::not_found(message)
            }
            StreamError::AlreadyExists(_) => Status::already_exists(message),
            StreamError::Rollback { ref source, .. } => match source {
                crate::stream::model::RollbackError::NoSuchGeneration { .. } => {
                    Status::not_found(message)
                }
                _ => Status::failed_precondition(message),
            },
            StreamError::Registry(ref r) => match r {
                RegistryError::InvalidReference { .. } => Status::invalid_argument(message),
                RegistryError::NotFound { .. } => Status::not_found(message),
                RegistryError::Unauthorized { .. } => Status::permission_denied(message),
                RegistryError::Unreachable { .. } => Status::unavailable(message),
                RegistryError::DigestMismatch { .. } | RegistryError::TooLarge { .. } => {
                    Status::failed_precondition(message)
                }
                RegistryError::Other { .. } => Status::unknown(message),
            },
            StreamError::Resolve(r) => r.into(),
            StreamError::Store(_) => Status::internal(message),
        }
    }
}

/// The tonic service.
pub struct AdminApi {
    streams: Arc<StreamService>,
}

impl AdminApi {
    pub fn new(streams: Arc<StreamService>) -> Self {
        Self { streams }
    }
}

fn key(namespace: String, name: String) -> StreamKey {
    StreamKey::new(namespace, name)
}

fn tag_ref(namespace: String, name: String, tag: String) -> Result<TagRef, Status> {
    crate::stream::names::validate_tag(&tag)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(TagRef {
        namespace,
        name,
        tag,
    })
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_stream(
        &self,
        req: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::Stream>, Status> {
        let r = req.into_inner();
        let s = self
            .streams
            .create(key(r.namespace, r.name), r.lookup_local)
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn list_streams(
        &self,
        req: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        let r = req.into_inner();
        let ns = Some(r.namespace.as_str()).filter(|n| !n.is_empty());
        if let Some(ns) = ns {
            crate::stream::names::validate_namespace(ns)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let streams = self.streams.list(ns).into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListStreamsResponse { streams }))
    }

    async fn get_stream(
        &self,
        req: Request<pb::GetStreamRequest>,
    ) -> Result<Response<pb::Stream>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.streams.get(&key(r.namespace, r.name))?.into(),
        ))
    }

    async fn delete_stream(
        &self,
        req: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        let r = req.into_inner();
        self.streams.delete(&key(r.namespace, r.name)).await?;
        Ok(Response::new(pb::DeleteStreamResponse {}))
    }

    async fn update_stream_access(
        &self,
        req: Request<pb::UpdateStreamAccessRequest>,
    ) -> Result<Response<pb::Stream>, Status> {
        let r = req.into_inner();
        let s = self
            .streams
            .update_access(
                &key(r.namespace, r.name),
                &r.allow,
                &r.deny,
                &r.remove,
                r.reset,
            )
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn set_tag(&self, req: Request<pb::SetTagRequest>) -> Result<Response<pb::Tag>, Status> {
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        if r.source.is_empty() {
            return Err(Status::invalid_argument(
                "source reference must not be empty",
            ));
        }
        Ok(Response::new(
            self.streams.set_tag(&t, &r.source).await?.into(),
        ))
    }

    async fn rollback_tag(
        &self,
        req: Request<pb::RollbackTagRequest>,
    ) -> Result<Response<pb::Tag>, Status> {
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        let to = Some(r.to_generation).filter(|g| *g != 0);
        Ok(Response::new(self.streams.rollback(&t, to).await?.into()))
    }

    async fn get_tag(&self, req: Request<pb::GetTagRequest>) -> Result<Response<pb::Tag>, Status> {
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        Ok(Response::new(self.streams.get_tag(&t)?.into()))
    }

    async fn delete_tag(
        &self,
        req: Request<pb::DeleteTagRequest>,
    ) -> Result<Response<pb::DeleteTagResponse>, Status> {
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        self.streams.delete_tag(&t).await?;
        Ok(Response::new(pb::DeleteTagResponse {}))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let r = req.into_inner();
        if r.reference.is_empty() {
            return Err(Status::invalid_argument("reference must not be empty"));
        }
        let ns = Some(r.namespace.as_str()).filter(|n| !n.is_empty());
        if let Some(ns) = ns {
            crate::stream::names::validate_namespace(ns)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let resolution = self
            .streams
            .resolve(&r.reference, ns)
            .map_err(Status::from)?;
        let resp = match resolution {
            Resolution::PassThrough => pb::ResolveResponse {
                reference: r.reference,
                ..Default::default()
            },
            Resolution::Pinned(p) => pb::ResolveResponse {
                reference: p.reference,
                is_stream: true,
                stream_namespace: p.tag.namespace,
                stream_name: p.tag.name,
                tag: p.tag.tag,
                generation: p.generation,
                digest: p.digest,
            },
            Resolution::NeedsNamespace { name, .. } => {
                return Err(Status::invalid_argument(format!(
                    "{:?} is a short name of image stream {name:?}; give --namespace to resolve it as a pod of that namespace would",
                    r.reference
                )));
            }
        };
        Ok(Response::new(resp))
    }
}

impl From<Stream> for pb::Stream {
    fn from(s: Stream) -> Self {
        pb::Stream {
            namespace: s.namespace,
            name: s.name,
            lookup_local: s.lookup_local,
            tags: s.tags.into_values().map(Into::into).collect(),
            access: Some(pb::Access {
                allow: s.access.allow,
                deny: s.access.deny,
            }),
        }
    }
}

impl From<Tag> for pb::Tag {
    fn from(t: Tag) -> Self {
        pb::Tag {
            name: t.name,
            source: t.source,
            generations: t.generations.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<Generation> for pb::Generation {
    fn from(g: Generation) -> Self {
        pb::Generation {
            generation: g.generation,
            digest: g.digest,
            reference: g.reference,
            created: g.created,
            cause: g.cause,
            source: g.source,
        }
    }
}
