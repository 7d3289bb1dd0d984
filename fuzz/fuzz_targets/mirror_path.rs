//! The mirror's request line as containerd (or anyone on the node) sends it: method, path and
//! query (`/v2/<name>/manifests/<ref>`, `/v2/<name>/blobs/<digest>`, `?ns=<registry>`) and a
//! `Range` header. Input: one byte for the method, then `PATH[?QUERY]`, optionally followed by a
//! newline and a Range value.
#![no_main]

use http::Method;
use imagestream::mirror::{
    check_blob_request, check_manifest_request, ns_param, parse_range, route, Route,
};
use imagestream::registry::RegistryClient;
use libfuzzer_sys::fuzz_target;

const METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::PUT,
    Method::POST,
    Method::DELETE,
    Method::PATCH,
];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = &METHODS[m as usize % METHODS.len()];
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (target, range) = match text.split_once('\n') {
        Some((t, r)) => (t, Some(r)),
        None => (text, None),
    };
    // As hyper hands it over (a parsed request target), and raw.
    if let Ok(pq) = http::uri::PathAndQuery::try_from(target) {
        check(method, pq.path(), pq.query().unwrap_or(""), range);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    check(method, path, query, range);
});

fn check(method: &Method, path: &str, query: &str, range: Option<&str>) {
    let pull = matches!(*method, Method::GET | Method::HEAD);
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    match route(method, path) {
        Route::Manifest { name, reference } => {
            assert!(pull);
            assert_eq!(format!("/v2/{name}/manifests/{reference}"), path);
            if check_manifest_request(name, reference).is_ok() {
                assert_name(name);
                assert!(!reference.is_empty() && !reference.contains('/'));
                upstream_reference(name, reference, query);
            }
        }
        Route::Blob { name, digest } => {
            assert!(pull);
            assert_eq!(format!("/v2/{name}/blobs/{digest}"), path);
            assert!(!rest.contains("/manifests/") && !rest.contains("/blobs/uploads"));
            if let Ok(d) = check_blob_request(name, digest) {
                assert_name(name);
                assert_eq!(d.as_str(), digest);
                for size in [0u64, 1, 100, u64::MAX] {
                    if let Some(Ok((start, end))) = range.map(|r| parse_range(r, size)) {
                        assert!(start < end && end <= size, "{start}..{end} of {size}");
                    }
                }
            }
        }
        Route::Write => assert!(!pull || rest.contains("/blobs/uploads")),
        Route::Base => assert!(path == "/v2/" || path == "/v2"),
        Route::Metrics => assert_eq!(path, "/metrics"),
        Route::Unknown => assert!(!(pull && rest.contains("/manifests/")), "{path:?}"),
    }
}

/// An accepted repository name is safe to put in an upstream URL: lowercase components, none
/// empty, `.` or `..`, nothing to escape.
fn assert_name(name: &str) {
    assert!(!name.is_empty() && name.len() <= 255);
    for c in name.split('/') {
        assert!(
            !c.is_empty() && c != "." && c != ".." && !c.contains(".."),
            "{name:?}"
        );
        assert!(
            c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)),
            "{name:?}"
        );
    }
}

/// What the cache asks the upstream for (`host/name:tag` or `host/name@digest`) names the same
/// repository, when the registry reference parser accepts it at all.
fn upstream_reference(name: &str, reference: &str, query: &str) {
    let host = ns_param(query).unwrap_or_else(|| "registry.example.com".into());
    assert_eq!(host, host.to_ascii_lowercase());
    let host = "registry.example.com"; // ns is checked against the configured upstreams
    let source = if reference.starts_with("sha256:") {
        format!("{host}/{name}@{reference}")
    } else {
        format!("{host}/{name}:{reference}")
    };
    if let Ok(r) = RegistryClient::parse(&source) {
        assert_eq!(r.registry(), host, "{source}");
        assert_eq!(r.repository(), name, "{source}");
        if reference.starts_with("sha256:") {
            assert_eq!(r.digest(), Some(reference));
        } else {
            assert_eq!(r.tag(), Some(reference));
        }
    }
}
