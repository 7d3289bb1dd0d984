//! Validation of the names that appear in stream references: Kubernetes namespace and
//! stream names (DNS-1123) and OCI tags. Every name is checked here before it reaches the
//! store, a path on disk or a registry URL.

use thiserror::Error;

/// Longest Kubernetes namespace name (a DNS-1123 label).
pub const MAX_NAMESPACE_LEN: usize = 63;
/// Longest stream name (a DNS-1123 subdomain).
pub const MAX_STREAM_NAME_LEN: usize = 253;
/// Longest OCI tag.
pub const MAX_TAG_LEN: usize = 128;

/// A name that breaks its grammar; the message names the value and the rule.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid namespace {value:?}: {why}")]
    Namespace { value: String, why: &'static str },
    #[error("invalid stream name {value:?}: {why}")]
    Stream { value: String, why: &'static str },
    #[error("invalid tag {value:?}: {why}")]
    Tag { value: String, why: &'static str },
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn dns_label(s: &str, max: usize) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > max {
        return Err("too long");
    }
    if !s.chars().all(|c| is_lower_alnum(c) || c == '-') {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    if !s.starts_with(is_lower_alnum) || !s.ends_with(is_lower_alnum) {
        return Err("must start and end with a lowercase letter or digit");
    }
    Ok(())
}

/// A Kubernetes namespace: a DNS-1123 label of at most 63 characters.
pub fn validate_namespace(value: &str) -> Result<(), NameError> {
    dns_label(value, MAX_NAMESPACE_LEN).map_err(|why| NameError::Namespace {
        value: value.to_string(),
        why: if why == "too long" {
            "longer than 63 characters"
        } else {
            why
        },
    })
}

/// A stream name: a DNS-1123 subdomain (dot-separated labels) of at most 253 characters.
pub fn validate_stream_name(value: &str) -> Result<(), NameError> {
    let err = |why| NameError::Stream {
        value: value.to_string(),
        why,
    };
    if value.len() > MAX_STREAM_NAME_LEN {
        return Err(err("longer than 253 characters"));
    }
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    for label in value.split('.') {
        dns_label(label, MAX_NAMESPACE_LEN).map_err(|why| {
            err(if why == "too long" {
                "a dot-separated part is longer than 63 characters"
            } else {
                why
            })
        })?;
    }
    Ok(())
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(value: &str) -> Result<(), NameError> {
    let err = |why| NameError::Tag {
        value: value.to_string(),
        why,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > MAX_TAG_LEN {
        return Err(err("longer than 128 characters"));
    }
    if value.starts_with(['.', '-']) {
        return Err(err("must start with a letter, digit or '_'"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(err("only letters, digits, '_', '.' and '-' are allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        assert!(validate_namespace("team-a").is_ok());
        assert!(validate_namespace("").is_err());
        assert!(validate_namespace("Team").is_err());
        assert!(validate_namespace("-a").is_err());
        assert!(validate_namespace("a.b").is_err());
        assert!(validate_namespace(&"a".repeat(64)).is_err());
        assert!(validate_namespace("..").is_err());
    }

    #[test]
    fn stream_names() {
        assert!(validate_stream_name("app").is_ok());
        assert!(validate_stream_name("my.app-1").is_ok());
        assert!(validate_stream_name("a..b").is_err());
        assert!(validate_stream_name("a/b").is_err());
        assert!(validate_stream_name(&"a".repeat(300)).is_err());
    }

    #[test]
    fn tags() {
        assert!(validate_tag("prod").is_ok());
        assert!(validate_tag("v1.2_3-rc").is_ok());
        assert!(validate_tag(".x").is_err());
        assert!(validate_tag("a/b").is_err());
        assert!(validate_tag(&"a".repeat(129)).is_err());
    }
}
