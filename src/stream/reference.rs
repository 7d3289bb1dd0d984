//! Parsing of image references into the three shapes the CRI path cares about: an explicit
//! stream reference (`<stream host>/<namespace>/<stream>:<tag>`), a short name that may name a
//! stream with `lookup_local` (`<stream>:<tag>`), and everything else, which passes through.

use super::names::{validate_namespace, validate_stream_name, validate_tag, NameError};
use thiserror::Error;

/// The default virtual registry host of stream references.
pub const DEFAULT_STREAM_HOST: &str = "imagestream.local";
/// The tag a reference without one names, as in docker and containerd.
pub const DEFAULT_TAG: &str = "latest";

/// A reference that claims to be a stream reference but is malformed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("invalid stream reference {reference:?}: {source}")]
    Name {
        reference: String,
        #[source]
        source: NameError,
    },
    #[error("invalid stream reference {reference:?}: {why}")]
    Shape {
        reference: String,
        why: &'static str,
    },
}

/// A stream tag, named by namespace, stream and tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagRef {
    pub namespace: String,
    pub name: String,
    pub tag: String,
}

impl std::fmt::Display for TagRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.tag)
    }
}

/// What an image reference is, as far as streams are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// `<stream host>/<namespace>/<stream>[:<tag>]`.
    Stream(TagRef),
    /// `<stream>[:<tag>]`: a stream only where a stream of that name has `lookup_local`.
    ShortName { name: String, tag: String },
    /// Anything else: not ours.
    Other,
}

fn split_tag(rest: &str) -> (&str, Option<&str>) {
    match rest.rfind(':') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    }
}

/// Classifies `reference` against the virtual stream registry host `stream_host`.
pub fn classify(reference: &str, stream_host: &str) -> Result<Classified, ReferenceError> {
    let shape = |why| ReferenceError::Shape {
        reference: reference.to_string(),
        why,
    };
    let named = |source| ReferenceError::Name {
        reference: reference.to_string(),
        source,
    };
    let (first, rest) = match reference.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (reference, None),
    };
    let Some(rest) = rest else {
        // A single component: a short name, or an image id, or something for the runtime.
        if reference.contains('@') || is_image_id(reference) {
            return Ok(Classified::Other);
        }
        let (name, tag) = split_tag(reference);
        let tag = tag.unwrap_or(DEFAULT_TAG);
        if validate_stream_name(name).is_err() || validate_tag(tag).is_err() {
            return Ok(Classified::Other);
        }
        return Ok(Classified::ShortName {
            name: name.to_string(),
            tag: tag.to_string(),
        });
    };
    if !first.eq_ignore_ascii_case(stream_host) {
        return Ok(Classified::Other);
    }
    if rest.contains('@') {
        return Err(shape(
            "stream references name a tag (host/namespace/stream:tag), not a digest",
        ));
    }
    let (path, tag) = split_tag(rest);
    let Some((namespace, name)) = path.split_once('/') else {
        return Err(shape("expected host/namespace/stream:tag"));
    };
    if name.contains('/') {
        return Err(shape(
            "expected host/namespace/stream:tag (too many path components)",
        ));
    }
    let tag = tag.unwrap_or(DEFAULT_TAG);
    validate_namespace(namespace).map_err(named)?;
    validate_stream_name(name).map_err(named)?;
    validate_tag(tag).map_err(named)?;
    Ok(Classified::Stream(TagRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
        tag: tag.to_string(),
    }))
}

/// An image id (`sha256:<64 hex>` or bare 64 hex digits), not a reference.
pub fn is_image_id(s: &str) -> bool {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses `NS/NAME:TAG` (the CLI's way to name a stream tag).
pub fn parse_tag_ref(s: &str) -> Result<TagRef, ReferenceError> {
    let shape = |why| ReferenceError::Shape {
        reference: s.to_string(),
        why,
    };
    let (path, tag) = split_tag(s);
    let tag = tag.ok_or_else(|| shape("expected NAMESPACE/STREAM:TAG"))?;
    let (namespace, name) = parse_stream_key(path)?;
    validate_tag(tag).map_err(|source| ReferenceError::Name {
        reference: s.to_string(),
        source,
    })?;
    Ok(TagRef {
        namespace,
        name,
        tag: tag.to_string(),
    })
}

/// Parses `NS/NAME` (the CLI's way to name a stream).
pub fn parse_stream_key(s: &str) -> Result<(String, String), ReferenceError> {
    let Some((namespace, name)) = s.split_once('/') else {
        return Err(ReferenceError::Shape {
            reference: s.to_string(),
            why: "expected NAMESPACE/STREAM",
        });
    };
    let named = |source| ReferenceError::Name {
        reference: s.to_string(),
        source,
    };
    validate_namespace(namespace).map_err(named)?;
    validate_stream_name(name).map_err(named)?;
    Ok((namespace.to_string(), name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = DEFAULT_STREAM_HOST;

    #[test]
    fn explicit_stream_reference() {
        assert_eq!(
            classify("imagestream.local/team-a/app:prod", H),
            Ok(Classified::Stream(TagRef {
                namespace: "team-a".into(),
                name: "app".into(),
                tag: "prod".into()
            }))
        );
        let Ok(Classified::Stream(t)) = classify("imagestream.local/team-a/app", H) else {
            panic!("not a stream ref")
        };
        assert_eq!(t.tag, "latest");
    }

    #[test]
    fn malformed_stream_references() {
        for bad in [
            "imagestream.local/app:prod",
            "imagestream.local/a/b/c:prod",
            "imagestream.local/Team/app:prod",
            "imagestream.local/../app:prod",
            "imagestream.local/team/app@sha256:00",
            "imagestream.local/team/app:",
        ] {
            assert!(classify(bad, H).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn short_names_and_others() {
        assert_eq!(
            classify("app:prod", H),
            Ok(Classified::ShortName {
                name: "app".into(),
                tag: "prod".into()
            })
        );
        for other in [
            "docker.io/library/nginx:1",
            "127.0.0.1:5000/app:v1",
            "library/nginx",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "nginx@sha256:0123",
            "Nginx",
        ] {
            assert_eq!(classify(other, H), Ok(Classified::Other), "{other}");
        }
    }

    #[test]
    fn tag_refs() {
        let t = parse_tag_ref("team-a/app:prod").expect("valid");
        assert_eq!(t.to_string(), "team-a/app:prod");
        assert!(parse_tag_ref("team-a/app").is_err());
        assert!(parse_tag_ref("app:prod").is_err());
        assert!(parse_stream_key("team-a/").is_err());
    }
}
