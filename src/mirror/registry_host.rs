//! Registry hosts (`HOST` or `HOST:PORT`) as the node's runtime configs name them: what the
//! config writers accept ([`check_registry`]), which registries are reached over plain HTTP
//! ([`plain_http`]), and the path prefix that names an upstream registry inside a repository
//! path ([`upstream_prefix`], [`split_upstream_prefix`]).
//!
//! containerd names the upstream in the `ns` query parameter. CRI-O (containers/image) cannot:
//! a `[[registry.mirror]]` location `MIRROR/PATH` makes it rewrite a pull of `REGISTRY/REPO:TAG`
//! to `MIRROR/PATH/REPO:TAG` (`Endpoint.rewriteReference`: the location, then the rest of the
//! reference after the matched prefix, parsed again as a reference), so the mirror is asked for
//! `/v2/PATH/REPO/...` without `ns`. `PATH` must therefore be valid repository path components
//! (`[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: lowercase, no `:`), and the mirror must tell it from
//! a repository name. The prefix is two components: the fixed marker [`UPSTREAM_MARKER`], then
//! the host with the port's `:` written as `_`:
//!
//! | upstream               | prefix                                        |
//! |------------------------|-----------------------------------------------|
//! | `registry.example.com` | `imagestream--upstream/registry.example.com`  |
//! | `127.0.0.1:5000`       | `imagestream--upstream/127.0.0.1_5000`        |
//!
//! A host name never contains `_` (the reference grammar's domain components are letters,
//! digits and inner `-`), so the `_` can only be the port separator and the encoding
//! round-trips. The port is canonical decimal (no leading zero, 1–65535) so that each host has
//! exactly one spelling. IPv6 literals (`[::1]:5000`) have no spelling in a path and are
//! refused.

use super::MirrorError;

/// The first path component of a repository name that carries its upstream registry. `--` is a
/// legal separator in the reference grammar that registries' own naming rules (Docker Hub's
/// `[a-z0-9]` namespaces, for one) make very unlikely in a real name; and a name under the
/// marker is only ever read as a prefix, never as a repository (see [`split_upstream_prefix`]).
pub const UPSTREAM_MARKER: &str = "imagestream--upstream";

/// Checks that `registry` is a host name with an optional port, safe as a directory name.
pub fn check_registry(registry: &str) -> Result<(), String> {
    let ok = !registry.is_empty()
        && registry.len() <= 253
        && !registry.starts_with('.')
        && !registry.contains("..")
        && registry
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{registry:?} is not a registry host (HOST or HOST:PORT)"
        ))
    }
}

/// Whether the runtime reaches `registry` over plain HTTP: loopback registries and those in the
/// daemon's `insecure_registries`.
pub fn plain_http(registry: &str, insecure: &[String]) -> bool {
    let loopback = registry.starts_with("127.")
        || registry.starts_with("localhost")
        || registry.starts_with("[::1]");
    loopback || insecure.iter().any(|h| h == registry)
}

/// `HOST[:PORT]` → the path component that names it (`:` → `_`), lowercased; an error naming
/// the value for anything else.
pub fn encode_host(registry: &str) -> Result<String, String> {
    let host = registry.to_ascii_lowercase();
    if host.starts_with('[') {
        return Err(format!(
            "{registry:?}: an IPv6 address cannot be named in a repository path; give the registry a host name"
        ));
    }
    check_host(&host)
        .map_err(|why| format!("{registry:?} is not a registry host (HOST or HOST:PORT): {why}"))?;
    Ok(host.replacen(':', "_", 1))
}

/// The inverse of [`encode_host`]: `127.0.0.1_5000` → `127.0.0.1:5000`.
pub fn decode_host(component: &str) -> Result<String, String> {
    if component.contains(':') || component.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("not a lowercase path component".to_string());
    }
    let host = component.replacen('_', ":", 1);
    check_host(&host)?;
    Ok(host)
}

/// `HOST[:PORT]` in the reference grammar's domain form, lowercase, with a canonical port.
fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if name.is_empty() || name.len() > 253 {
        return Err("the host name is empty or too long".to_string());
    }
    for label in name.split('.') {
        let b = label.as_bytes();
        let ok = !b.is_empty()
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if !ok {
            return Err(format!(
                "{label:?} is not a host name label (letters, digits, inner '-')"
            ));
        }
    }
    if let Some(port) = port {
        let canonical = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0 && p.to_string() == port);
        if canonical.is_none() {
            return Err(format!("{port:?} is not a port (1-65535, no leading zero)"));
        }
    }
    Ok(())
}

/// The repository path prefix that names `registry` as the upstream:
/// `imagestream--upstream/<encoded host>`.
pub fn upstream_prefix(registry: &str) -> Result<String, String> {
    Ok(format!("{UPSTREAM_MARKER}/{}", encode_host(registry)?))
}

/// Splits a repository name that starts with [`UPSTREAM_MARKER`] into the upstream host and
/// the repository: `imagestream--upstream/127.0.0.1_5000/team/app` →
/// `Some(("127.0.0.1:5000", "team/app"))`. A name not under the marker is `None` (an ordinary
/// name). A name under the marker without a valid host and a repository after it is refused:
/// it is never taken for an ordinary name.
pub fn split_upstream_prefix(name: &str) -> Result<Option<(String, &str)>, MirrorError> {
    let Some(rest) = name
        .strip_prefix(UPSTREAM_MARKER)
        .and_then(|r| r.strip_prefix('/').or(r.is_empty().then_some(r)))
    else {
        return Ok(None);
    };
    let invalid = |why: String| MirrorError::UpstreamPrefixInvalid {
        name: name.chars().take(300).collect(),
        why,
    };
    let (component, repository) = rest.split_once('/').unwrap_or((rest, ""));
    if component.is_empty() {
        return Err(invalid("no upstream registry after the marker".to_string()));
    }
    let host = decode_host(component)
        .map_err(|why| invalid(format!("{component:?} does not name a registry: {why}")))?;
    if repository.is_empty() {
        return Err(invalid(
            "no repository after the upstream registry".to_string(),
        ));
    }
    Ok(Some((host, repository)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_round_trips() {
        for (host, encoded) in [
            ("registry.example.com", "registry.example.com"),
            ("127.0.0.1:5000", "127.0.0.1_5000"),
            ("localhost:5000", "localhost_5000"),
            ("docker.io", "docker.io"),
            (
                "my-registry--x.example:65535",
                "my-registry--x.example_65535",
            ),
            ("a", "a"),
        ] {
            assert_eq!(encode_host(host).as_deref(), Ok(encoded));
            assert_eq!(decode_host(encoded).as_deref(), Ok(host));
            let prefix = upstream_prefix(host).expect("prefix");
            let name = format!("{prefix}/team/app");
            // Every prefix is a valid repository name, and the mirror reads back the host.
            assert!(crate::mirror::check_name(&name).is_ok(), "{name}");
            let (h, repo) = split_upstream_prefix(&name).expect("ok").expect("prefixed");
            assert_eq!((h.as_str(), repo), (host, "team/app"));
        }
        // Hosts are case-insensitive: the prefix is lowercase.
        assert_eq!(
            encode_host("Registry.Example.COM:443").as_deref(),
            Ok("registry.example.com_443")
        );
    }

    #[test]
    fn refuses_what_has_no_spelling() {
        for bad in [
            "",
            "[::1]:5000",
            "a_b.example",
            "-a.example",
            "a-.example",
            "a..b",
            ".a",
            "a.",
            "host:",
            "host:0",
            "host:05000",
            "host:65536",
            "host:50:00",
            "host/x",
            "host:port",
        ] {
            let e = encode_host(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        for bad in [
            "",
            "a_",
            "_5000",
            "a_b_5000",
            "a_05",
            "A.example",
            "a:5000",
            "a__5000",
        ] {
            assert!(decode_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn splits_prefixed_names() {
        assert!(matches!(split_upstream_prefix("library/busybox"), Ok(None)));
        // Only the whole first component is the marker.
        assert!(matches!(
            split_upstream_prefix("imagestream--upstreamx/a/b"),
            Ok(None)
        ));
        assert!(matches!(
            split_upstream_prefix("x/imagestream--upstream/a/b"),
            Ok(None)
        ));
        assert_eq!(
            split_upstream_prefix("imagestream--upstream/docker.io/library/busybox")
                .expect("ok")
                .expect("some"),
            ("docker.io".to_string(), "library/busybox")
        );
        for bad in [
            "imagestream--upstream",
            "imagestream--upstream/",
            "imagestream--upstream/127.0.0.1_5000",
            "imagestream--upstream/127.0.0.1_5000/",
            "imagestream--upstream/127.0.0.1_0/app",
            "imagestream--upstream/a_b_1/app",
            "imagestream--upstream/-x/app",
        ] {
            let e = split_upstream_prefix(bad).expect_err(bad);
            assert_eq!(e.status_and_code(false).1, "NAME_INVALID", "{bad}");
        }
    }

    #[test]
    fn shared_registry_rules() {
        assert!(plain_http("127.0.0.1:5000", &[]));
        assert!(plain_http("localhost:5000", &[]));
        assert!(plain_http("r.example:5000", &["r.example:5000".into()]));
        assert!(!plain_http("r.example", &[]));
        assert!(check_registry("../etc").is_err());
        assert!(check_registry("a/b").is_err());
        assert!(check_registry("r.example:5000").is_ok());
    }
}
