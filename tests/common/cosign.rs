//! The real `cosign` (v2, built by `bash scripts/test-tools.sh cosign`) against the test
//! [`Registry`](super::Registry): the reference signer and verifier that imagestream's own
//! signature checks are compared with.
//!
//! - [`CosignKey::generate`]: an ECDSA P-256 key pair (`cosign generate-key-pair`, empty
//!   password) in a temp dir of its own.
//! - [`sign`]: `cosign sign --key` of an image by digest, key-based and offline (no
//!   transparency log), in cosign's legacy layout: an OCI manifest under the tag
//!   [`signature_tag`] (`sha256-<hex>.sig`) in the image's repository, whose layer is the
//!   simple-signing payload (`application/vnd.dev.cosign.simplesigning.v1+json`) carrying the
//!   base64 signature in the annotation [`SIGNATURE_ANNOTATION`]. cosign 2.x writes no
//!   referrers and no Sigstore bundle for it.
//! - [`verify`] / [`verify_result`]: `cosign verify --key`, offline: whether cosign accepts the
//!   image's signatures (the "truth").
//! - Forgeries, published over plain HTTP the way a registry user could: [`copy_signature`]
//!   (one image's signature under another image's tag), [`tamper_payload`] (the payload
//!   changed, the signature kept) and [`corrupt_signature`] (the signature changed, the payload
//!   kept).
//!
//! cosign never leaves loopback here: every run gets a cleared environment (no `COSIGN_*`,
//! `SIGSTORE_*` or `TUF_*` of the caller's, `HOME` in the key's temp dir so that no docker
//! credentials or TUF cache of the machine are read or written), signing uploads nothing to
//! Rekor (`--tlog-upload=false`), and verification is given an empty trusted root
//! (`--trusted-root`) so that it does not fetch Sigstore's from the TUF CDN, which
//! `cosign verify --key` otherwise tries on every run (and only warns when it cannot). As a
//! guard for any other TUF look-up, `TUF_MIRROR` names a closed loopback port.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine as _;
use tempfile::TempDir;

use super::crash::push_blob;
use super::mirror::http_fetch;
use super::registry_manifest_bytes;
use super::tools::tool;

/// Media type of the layer that holds cosign's simple-signing payload.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

/// The layer annotation holding the base64 signature of the payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// An empty Sigstore trusted root: no CA, transparency log or timestamp authority is trusted,
/// only the key given on the command line.
const EMPTY_TRUSTED_ROOT: &str =
    r#"{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1"}"#;

/// A TUF mirror that cannot answer (a closed port on loopback): a TUF look-up cosign might still
/// make fails at once instead of reaching the internet.
const DEAD_TUF_MIRROR: &str = "http://127.0.0.1:9";

/// Timeout of the HTTP requests made to the registry here.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A cosign key pair with an empty password, in a temp dir of its own (removed on drop).
pub struct CosignKey {
    /// Holds the keys, the trusted root given to `cosign verify`, and cosign's `HOME`.
    dir: TempDir,
    /// `cosign.key`: the encrypted private key (password "").
    pub private: PathBuf,
    /// `cosign.pub`: the public key (PEM, ECDSA P-256).
    pub public: PathBuf,
}

impl CosignKey {
    /// Runs `cosign generate-key-pair` (password "") in a fresh temp dir and checks that it made
    /// an ECDSA P-256 public key.
    pub fn generate() -> CosignKey {
        let dir = tempfile::Builder::new()
            .prefix("iscosign-")
            .tempdir()
            .expect("create a temp dir for a cosign key pair");
        let key = CosignKey {
            private: dir.path().join("cosign.key"),
            public: dir.path().join("cosign.pub"),
            dir,
        };
        fs::write(key.trusted_root(), EMPTY_TRUSTED_ROOT).expect("write the empty trusted root");
        let out = run_cosign(&key, &["generate-key-pair"]);
        if !out.status.success() {
            panic!(
                "cosign generate-key-pair failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let pem = fs::read_to_string(&key.public).unwrap_or_else(|e| {
            panic!(
                "cosign generate-key-pair wrote no {}: {e}",
                key.public.display()
            )
        });
        assert!(
            is_p256_public_key_pem(&pem),
            "cosign.pub is not an ECDSA P-256 public key:\n{pem}"
        );
        assert!(
            key.private.is_file(),
            "cosign generate-key-pair wrote no cosign.key"
        );
        key
    }

    /// The empty trusted root `cosign verify` is given.
    fn trusted_root(&self) -> PathBuf {
        self.dir.path().join("trusted_root.json")
    }
}

/// Whether `pem` is a SubjectPublicKeyInfo of an EC key on P-256: its DER holds the OIDs of
/// id-ecPublicKey (1.2.840.10045.2.1) and prime256v1 (1.2.840.10045.3.1.7).
fn is_p256_public_key_pem(pem: &str) -> bool {
    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const PRIME256V1: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
    pem.contains("-----BEGIN PUBLIC KEY-----") && has(EC_PUBLIC_KEY) && has(PRIME256V1)
}

/// Runs cosign with `args` in the key's dir, with a cleared environment (see the module docs);
/// panics only if it cannot be started.
fn run_cosign(key: &CosignKey, args: &[&str]) -> Output {
    run_cosign_with(key, args, &[])
}

/// [`run_cosign`] with `envs` added to the cleared environment.
fn run_cosign_with(key: &CosignKey, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let cosign = tool("cosign");
    let home = key.dir.path();
    Command::new(&cosign)
        .args(args)
        .current_dir(home)
        .env_clear()
        .envs(envs.iter().copied())
        .env("HOME", home)
        .env("COSIGN_PASSWORD", "")
        .env("TUF_ROOT", home.join("tuf"))
        .env("TUF_MIRROR", DEAD_TUF_MIRROR)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", cosign.display()))
}

/// Signs `image` (`127.0.0.1:PORT/repo@sha256:...`) with `key` and uploads the signature to the
/// image's repository under [`signature_tag`] (cosign's legacy layout; a second signature of the
/// same image is added to that manifest as another layer). Offline: nothing goes to Rekor.
/// Panics with cosign's output if it fails.
pub fn sign(key: &CosignKey, image: &str) {
    sign_with(key, image, &[], &[]);
}

/// `cosign sign --key` of `image` with `extra` flags and `envs`; panics with cosign's output if
/// it fails.
fn sign_with(key: &CosignKey, image: &str, extra: &[&str], envs: &[(&str, &str)]) {
    let private = path_arg(&key.private);
    let mut args = vec![
        "sign",
        "--key",
        &private,
        "--tlog-upload=false",
        "--allow-http-registry",
        "--yes",
    ];
    args.extend_from_slice(extra);
    args.push(image);
    let out = run_cosign_with(key, &args, envs);
    if !out.status.success() {
        panic!(
            "cosign sign {extra:?} {image} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Like [`sign`], stored the OCI 1.1 way (`--registry-referrers-mode=oci-1-1`, experimental in
/// cosign 2): a manifest with artifact type `application/vnd.dev.cosign.artifact.sig.v1+json`
/// whose `subject` is the image. A registry without the referrers API (docker-registry 2.8)
/// lists it in the fallback index under the tag `sha256-<hex>` (the OCI 1.1 referrers tag
/// schema), which go-containerregistry maintains for cosign.
pub fn sign_as_referrer(key: &CosignKey, image: &str) {
    sign_with(
        key,
        image,
        &["--registry-referrers-mode=oci-1-1"],
        &[("COSIGN_EXPERIMENTAL", "1")],
    );
}

/// Whether cosign accepts `image`'s signatures with `key` ([`verify_result`] is `Ok`). A
/// rejection's reason is printed to stderr (the test's output).
pub fn verify(key: &CosignKey, image: &str) -> bool {
    match verify_result(key, image) {
        Ok(_) => true,
        Err(reason) => {
            eprintln!("cosign verify rejected {image}: {reason}");
            false
        }
    }
}

/// `cosign verify --key` of `image`, offline (no transparency log or certificate timestamps,
/// an empty trusted root): Ok(cosign's stdout, the verified payloads as JSON) if it accepts the
/// image, Err(cosign's stderr) if it rejects it. Panics if cosign cannot be run or is killed.
pub fn verify_result(key: &CosignKey, image: &str) -> Result<String, String> {
    verify_result_with(key, image, &[])
}

/// [`verify_result`] with `extra` flags (e.g. `--experimental-oci11`, to find signatures stored
/// as OCI 1.1 referrers: [`sign_as_referrer`]).
pub fn verify_result_with(key: &CosignKey, image: &str, extra: &[&str]) -> Result<String, String> {
    let public = path_arg(&key.public);
    let trusted_root = path_arg(&key.trusted_root());
    let mut args = vec![
        "verify",
        "--key",
        &public,
        "--insecure-ignore-tlog=true",
        "--insecure-ignore-sct=true",
        "--trusted-root",
        &trusted_root,
        "--allow-http-registry",
    ];
    args.extend_from_slice(extra);
    args.push(image);
    let out = run_cosign_with(key, &args, &[("COSIGN_EXPERIMENTAL", "1")]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0) => Ok(stdout),
        Some(_) => Err(stderr),
        None => panic!(
            "cosign verify {image} was killed ({}): {stderr}",
            out.status
        ),
    }
}

fn path_arg(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("path {} is not UTF-8", path.display()))
        .to_string()
}

/// The tag cosign stores the signatures of the image `digest` (`sha256:<hex>`) under:
/// `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> String {
    let (algorithm, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("{digest:?} is not a digest (ALGORITHM:HEX)"));
    format!("{algorithm}-{hex}.sig")
}

/// The signature manifest of image `digest` in `repo` (under [`signature_tag`]), parsed;
/// panics if there is none.
pub fn signature_manifest(registry_addr: &str, repo: &str, digest: &str) -> serde_json::Value {
    let tag = signature_tag(digest);
    let bytes = registry_manifest_bytes(registry_addr, repo, &tag);
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "signature manifest {repo}:{tag} is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// PUTs `manifest` (with its own `mediaType` as Content-Type) under `tag` in `repo`.
fn put_manifest(registry_addr: &str, repo: &str, tag: &str, manifest: &[u8]) {
    let parsed: serde_json::Value = serde_json::from_slice(manifest).unwrap_or_else(|e| {
        panic!(
            "manifest for {repo}:{tag} is not JSON ({e}): {}",
            String::from_utf8_lossy(manifest)
        )
    });
    let media_type = parsed["mediaType"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest for {repo}:{tag} has no mediaType: {parsed}"));
    let r = http_fetch(
        registry_addr,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Content-Type", media_type)],
        manifest,
        HTTP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("PUT manifest {repo}:{tag} to {registry_addr}: {e}"));
    assert_eq!(
        r.status,
        201,
        "PUT manifest {repo}:{tag} to {registry_addr}: {}",
        r.body_text()
    );
}

/// Re-publishes a signature manifest under the signature tag of `digest`.
fn put_signature_manifest(
    registry_addr: &str,
    repo: &str,
    digest: &str,
    manifest: &serde_json::Value,
) {
    let bytes = serde_json::to_vec(manifest).expect("serialize a signature manifest");
    put_manifest(registry_addr, repo, &signature_tag(digest), &bytes);
}

/// The only layer of a signature manifest (cosign's simple-signing payload), mutable.
fn payload_layer<'a>(manifest: &'a mut serde_json::Value, what: &str) -> &'a mut serde_json::Value {
    let layers = manifest["layers"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{what}: signature manifest without layers"));
    assert_eq!(
        layers.len(),
        1,
        "{what}: expected one signature layer, found {}",
        layers.len()
    );
    &mut layers[0]
}

/// Puts the signature manifest of image `from_digest` under the signature tag of `to_digest`, in
/// the same repository `repo` (its blobs are there already): a genuine signature, for another
/// image. Byte for byte, with its content type.
pub fn copy_signature(registry_addr: &str, repo: &str, from_digest: &str, to_digest: &str) {
    let bytes = registry_manifest_bytes(registry_addr, repo, &signature_tag(from_digest));
    put_manifest(registry_addr, repo, &signature_tag(to_digest), &bytes);
}

/// Re-publishes the signature of image `digest` with another payload under the original
/// signature: the payload's `critical.identity.docker-reference` gets a suffix, so it still
/// parses and still names `digest`, but its bytes are no longer those signed. The new payload
/// is uploaded as a blob and the layer's digest and size point at it.
pub fn tamper_payload(registry_addr: &str, repo: &str, digest: &str) {
    let mut manifest = signature_manifest(registry_addr, repo, digest);
    let layer = payload_layer(&mut manifest, "tamper_payload");
    let payload_digest = layer["digest"]
        .as_str()
        .expect("signature layer without a digest")
        .to_string();
    let payload = get_blob(registry_addr, repo, &payload_digest);
    let mut claims: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_else(|e| {
        panic!(
            "signature payload {payload_digest} is not JSON ({e}): {}",
            String::from_utf8_lossy(&payload)
        )
    });
    let reference = claims["critical"]["identity"]["docker-reference"]
        .as_str()
        .unwrap_or_else(|| panic!("payload without critical.identity.docker-reference: {claims}"))
        .to_string();
    claims["critical"]["identity"]["docker-reference"] =
        serde_json::Value::String(format!("{reference}-tampered"));
    assert_eq!(
        claims["critical"]["image"]["docker-manifest-digest"].as_str(),
        Some(digest),
        "the payload of {digest}'s signature names another image: {claims}"
    );
    let tampered = serde_json::to_vec(&claims).expect("serialize the tampered payload");
    assert_ne!(tampered, payload, "the tampered payload is unchanged");
    let new_digest = push_blob(registry_addr, repo, &tampered);
    layer["digest"] = serde_json::Value::String(new_digest);
    layer["size"] = serde_json::Value::from(tampered.len());
    put_signature_manifest(registry_addr, repo, digest, &manifest);
}

/// Re-publishes the signature of image `digest` with the [`SIGNATURE_ANNOTATION`] replaced by
/// valid base64 of other bytes (the decoded signature with its last byte flipped: still DER, but
/// no longer a signature of the payload), the payload unchanged.
pub fn corrupt_signature(registry_addr: &str, repo: &str, digest: &str) {
    let mut manifest = signature_manifest(registry_addr, repo, digest);
    let layer = payload_layer(&mut manifest, "corrupt_signature");
    let b64 = layer["annotations"][SIGNATURE_ANNOTATION]
        .as_str()
        .unwrap_or_else(|| panic!("signature layer without {SIGNATURE_ANNOTATION}: {layer}"));
    let engine = base64::engine::general_purpose::STANDARD;
    let mut signature = engine
        .decode(b64)
        .unwrap_or_else(|e| panic!("{SIGNATURE_ANNOTATION} {b64:?} is not base64: {e}"));
    let last = signature
        .last_mut()
        .unwrap_or_else(|| panic!("{SIGNATURE_ANNOTATION} is empty"));
    *last ^= 0x01;
    layer["annotations"][SIGNATURE_ANNOTATION] =
        serde_json::Value::String(engine.encode(signature));
    put_signature_manifest(registry_addr, repo, digest, &manifest);
}

/// The bytes of blob `digest` in `repo`.
fn get_blob(registry_addr: &str, repo: &str, digest: &str) -> Vec<u8> {
    let r = http_fetch(
        registry_addr,
        "GET",
        &format!("/v2/{repo}/blobs/{digest}"),
        &[],
        &[],
        HTTP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("GET blob {repo}@{digest} from {registry_addr}: {e}"));
    assert_eq!(
        r.status,
        200,
        "GET blob {repo}@{digest} from {registry_addr}: {}",
        r.body_text()
    );
    r.body
}
