//! Mutual TLS between the nodes of a cluster, for the peer endpoint (nodes serving cached blobs
//! to each other over HTTPS).
//!
//! # Trust model
//!
//! - A **cluster CA** (`ca.pem`, key `ca-key.pem`) is made once by `imagestream peer certs`. Its
//!   certificate goes to every node; its key stays with the operator (no node needs it).
//! - Every node has a **node certificate** (`NAME.pem`, key `NAME-key.pem`) issued by that CA.
//!   Its subject alternative names are the node's IP addresses, its name and any extra DNS
//!   names; its extended key usage is both `serverAuth` and `clientAuth`, because a node is the
//!   server of the peers that pull from it and the client of the peers it pulls from.
//! - The **server** ([`server_config`]) requires a client certificate that chains to the CA:
//!   anonymous clients are refused in the handshake. Any node of the cluster is accepted (the
//!   client's name is not checked): the CA is the cluster.
//! - The **client** ([`client_config`]) trusts only the CA, checks that the server's
//!   certificate names the address it dialled, and presents its own node certificate.
//! - **No system roots anywhere**: a certificate from a public CA means nothing here.
//!
//! There is no revocation: a node certificate is valid until it expires
//! ([`NODE_CERT_VALIDITY`]). To shut a leaked node key out before that, make a new CA (remove
//! `ca.pem` and `ca-key.pem`, re-run the command for every node) and roll it out.
//!
//! Every config is built with an explicit crypto provider (aws-lc-rs): both ring and aws-lc-rs
//! are compiled into the binary, so rustls' process-wide default provider is ambiguous.
//!
//! Keys are ECDSA P-256 (PKCS#8 PEM). Every file [`generate`] writes has mode 0600 and is
//! written atomically (a temporary file in the same directory, fsync, rename, fsync of the
//! directory).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The largest PEM file read (certificate, chain or key). A certificate is a few hundred bytes
/// and a chain a few KiB; the cap keeps a wrong path (a log, an image) from being read whole.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Validity of the cluster CA: 10 years. The CA certificate is on every node, so replacing it
/// means a rollout to the whole cluster; its key is not on any node (it stays with the
/// operator), which makes a long life acceptable.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Validity of a node certificate: 1 year. There is no revocation, so this bounds how long a
/// leaked node key stays usable; renewing is re-running `imagestream peer certs` for the node
/// (the CA in the directory is reused).
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How far before "now" certificates start to be valid: one hour, so that a node whose clock is
/// a little behind the machine that made the certificates still accepts them.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// File name of the CA certificate in the directory of [`generate`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key in the directory of [`generate`].
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Common name of the CA that [`generate`] makes, followed by a space and the first 8 bytes (hex)
/// of the CA key's identifier, so that the CAs of two clusters have different subjects (a node
/// of one cluster shown a certificate of the other then reports an unknown issuer). An existing
/// CA is reused only if its subject is the one rebuilt from its key: rcgen here cannot parse a
/// certificate, and the node certificates' issuer must be byte for byte the CA's subject.
const CA_COMMON_NAME: &str = "imagestream peer CA";
/// Organization of every certificate [`generate`] makes.
const ORGANIZATION: &str = "imagestream";

/// ALPN protocols of both sides: HTTP/2 first, HTTP/1.1 as fallback.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What went wrong with the peer TLS files; every variant names the file(s).
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {limit} bytes: not a PEM certificate or key")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path} is not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate (expected a PEM block \"BEGIN CERTIFICATE\")")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no private key (expected a PEM block \"BEGIN PRIVATE KEY\", \"BEGIN EC PRIVATE KEY\" or \"BEGIN RSA PRIVATE KEY\")")]
    NoPrivateKey { path: PathBuf },
    #[error("{path}: unusable private key: {reason}")]
    InvalidKey { path: PathBuf, reason: String },
    #[error("the private key {key_file} does not match the certificate {cert_file}")]
    KeyMismatch {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    #[error("CA {path} is not usable: {reason}")]
    CaInvalid { path: PathBuf, reason: String },
    #[error("{present} exists but {missing} does not: restore it, or remove {present} to make a new CA (then re-issue every node's certificate)")]
    CaIncomplete { present: PathBuf, missing: PathBuf },
    #[error("certificate {cert_file} is not valid under the CA {ca_file}: {reason}")]
    CertNotTrusted {
        cert_file: PathBuf,
        ca_file: PathBuf,
        reason: String,
    },
    #[error("TLS config from {cert_file} and {key_file}: {reason}")]
    Config {
        cert_file: PathBuf,
        key_file: PathBuf,
        reason: String,
    },
    #[error("invalid node {spec:?}: {reason} (expected NAME=IP[,IP|DNS...], e.g. node-a=10.0.0.1,node-a.lan)")]
    NodeSpec { spec: String, reason: String },
    #[error("node {name} is given twice")]
    DuplicateNode { name: String },
    #[error("no node given: nothing to issue")]
    NoNodes,
    #[error("cannot make {what}: {reason}")]
    Generate { what: String, reason: String },
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The three files a node's peer endpoint uses (config keys `peer_ca_file`, `peer_cert_file`,
/// `peer_key_file`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsFiles {
    /// The cluster CA certificate(s), PEM: the only roots trusted, on both sides.
    pub ca_file: PathBuf,
    /// This node's certificate, PEM (leaf first; intermediates may follow).
    pub cert_file: PathBuf,
    /// This node's private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
}

/// The loaded and checked contents of [`TlsFiles`].
struct Loaded {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads a file of at most [`MAX_PEM_BYTES`].
fn read_capped(path: &Path) -> Result<Vec<u8>, PeerTlsError> {
    let read_err = |source| PeerTlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(PeerTlsError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_PEM_BYTES,
        });
    }
    Ok(bytes)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PeerTlsError> {
    let bytes = read_capped(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PeerTlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PeerTlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PeerTlsError> {
    let bytes = read_capped(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PeerTlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        e => PeerTlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// A root store holding every certificate of `path`, each checked to be a usable trust anchor.
fn read_roots(path: &Path) -> Result<RootCertStore, PeerTlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| PeerTlsError::CaInvalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn load(files: &TlsFiles) -> Result<Loaded, PeerTlsError> {
    let provider = provider();
    let roots = read_roots(&files.ca_file)?;
    let chain = read_certs(&files.cert_file)?;
    let key = read_key(&files.key_file)?;
    let config_err = |reason: String| PeerTlsError::Config {
        cert_file: files.cert_file.clone(),
        key_file: files.key_file.clone(),
        reason,
    };
    // The key must load and match the leaf (rustls compares the public keys).
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
        |e| match e {
            rustls::Error::InconsistentKeys(_) => PeerTlsError::KeyMismatch {
                cert_file: files.cert_file.clone(),
                key_file: files.key_file.clone(),
            },
            e => PeerTlsError::InvalidKey {
                path: files.key_file.clone(),
                reason: e.to_string(),
            },
        },
    )?;
    // Our own certificate must be one the peers accept: say so now, naming the files, rather
    // than as a handshake failure on another node.
    let leaf = chain
        .first()
        .ok_or_else(|| config_err("empty certificate chain".into()))?;
    let not_trusted = |e: rustls::Error| PeerTlsError::CertNotTrusted {
        cert_file: files.cert_file.clone(),
        ca_file: files.ca_file.clone(),
        reason: e.to_string(),
    };
    let parsed = ParsedCertificate::try_from(leaf).map_err(not_trusted)?;
    let intermediates = chain.get(1..).unwrap_or_default();
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(not_trusted)?;
    Ok(Loaded {
        provider,
        roots: Arc::new(roots),
        chain,
        key,
    })
}

fn alpn() -> Vec<Vec<u8>> {
    ALPN.iter().map(|p| p.to_vec()).collect()
}

/// Server side: requires and verifies a client certificate chaining to the CA (rustls
/// [`WebPkiClientVerifier`], no anonymous clients); ALPN `["h2", "http/1.1"]`.
///
/// Fails, naming the file, if a file is unreadable or malformed, the key does not match the
/// certificate, or this node's certificate is not valid under the CA (e.g. expired).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, PeerTlsError> {
    let loaded = load(files)?;
    let config_err = |reason: String| PeerTlsError::Config {
        cert_file: files.cert_file.clone(),
        key_file: files.key_file.clone(),
        reason,
    };
    let verifier =
        WebPkiClientVerifier::builder_with_provider(loaded.roots.clone(), loaded.provider.clone())
            .build()
            .map_err(|e| PeerTlsError::CaInvalid {
                path: files.ca_file.clone(),
                reason: e.to_string(),
            })?;
    let mut config = ServerConfig::builder_with_provider(loaded.provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(loaded.chain, loaded.key)
        .map_err(|e| config_err(e.to_string()))?;
    config.alpn_protocols = alpn();
    Ok(Arc::new(config))
}

/// Client side: trusts only the CA, presents this node's certificate; ALPN
/// `["h2", "http/1.1"]`. (Meant for reqwest's `use_preconfigured_tls`.)
///
/// The server's certificate must name the address dialled (an IP SAN when dialling an IP).
/// Fails like [`server_config`].
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, PeerTlsError> {
    let loaded = load(files)?;
    let config_err = |reason: String| PeerTlsError::Config {
        cert_file: files.cert_file.clone(),
        key_file: files.key_file.clone(),
        reason,
    };
    let mut config = ClientConfig::builder_with_provider(loaded.provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(e.to_string()))?
        .with_root_certificates(loaded.roots)
        .with_client_auth_cert(loaded.chain, loaded.key)
        .map_err(|e| config_err(e.to_string()))?;
    config.alpn_protocols = alpn();
    Ok(config)
}

/// A node to make a certificate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's name: a DNS label; also the file names `NAME.pem`, `NAME-key.pem` and a DNS
    /// SAN of the certificate.
    pub name: String,
    /// The addresses peers dial (IP SANs); at least one.
    pub ips: Vec<IpAddr>,
    /// Extra DNS names (DNS SANs), lowercase.
    pub dns: Vec<String>,
}

/// Checks a DNS label: 1 to 63 of lowercase ASCII letters, digits and '-', not starting or
/// ending with '-'.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty name".into());
    }
    if label.len() > 63 {
        return Err(format!("{label:?} is longer than 63 characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{label:?} has {c:?}: only lowercase letters, digits and '-' are allowed"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("{label:?} starts or ends with '-'"));
    }
    Ok(())
}

/// Checks a DNS name (labels separated by '.', at most 253 characters; lowercase).
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err(format!("DNS name {name:?} is longer than 253 characters"));
    }
    name.split('.')
        .try_for_each(check_label)
        .map_err(|e| format!("DNS name {name:?}: {e}"))
}

impl FromStr for NodeSpec {
    type Err = PeerTlsError;

    /// Parses `NAME=IP[,IP|DNS...]`, e.g. `node-a=10.0.0.1,node-a.lan`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| PeerTlsError::NodeSpec {
            spec: spec.to_string(),
            reason,
        };
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| err("no '=' after the node's name".into()))?;
        let name = name.trim();
        check_label(name).map_err(|e| err(format!("node name: {e}")))?;
        if name == "ca" || name.ends_with("-key") {
            return Err(err(format!(
                "node name {name:?} is reserved: its files would collide with the CA's or another node's key"
            )));
        }
        let mut ips = Vec::new();
        let mut dns = Vec::new();
        for entry in rest.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(err("empty address".into()));
            }
            if let Ok(ip) = entry.parse::<IpAddr>() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            } else {
                let name = entry.to_ascii_lowercase();
                check_dns_name(&name).map_err(|e| err(format!("{e} (and not an IP address)")))?;
                if !dns.contains(&name) {
                    dns.push(name);
                }
            }
        }
        if ips.is_empty() {
            return Err(err(
                "no IP address: peers dial nodes by IP, so the certificate must name at least one"
                    .into(),
            ));
        }
        Ok(NodeSpec {
            name: name.to_string(),
            ips,
            dns,
        })
    }
}

/// The subject of every certificate [`generate`] makes.
fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Sets validity from now - [`CLOCK_SKEW_ALLOWANCE`] to now + `validity`.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now();
    params.not_before = now
        .checked_sub(CLOCK_SKEW_ALLOWANCE)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .into();
    params.not_after = now
        .checked_add(validity)
        .unwrap_or(now + Duration::from_secs(24 * 60 * 60))
        .into();
}

/// The CA's common name for `key`: [`CA_COMMON_NAME`] and the start of the key's identifier.
fn ca_common_name(params: &CertificateParams, key: &KeyPair) -> String {
    let id = params.key_identifier(key);
    let hex: String = id.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{CA_COMMON_NAME} {hex}")
}

/// The CA's parameters for `key`, without validity. Deterministic: an existing CA is reused by
/// rebuilding its subject from these.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&ca_common_name(&params, key));
    // Path length 0: the CA issues node certificates only, no intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn node_params(node: &NodeSpec) -> Result<CertificateParams, PeerTlsError> {
    let gen_err = |e: rcgen::Error| PeerTlsError::Generate {
        what: format!("the certificate of node {}", node.name),
        reason: e.to_string(),
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&node.name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let mut sans = vec![SanType::DnsName(
        node.name.clone().try_into().map_err(gen_err)?,
    )];
    sans.extend(node.ips.iter().copied().map(SanType::IpAddress));
    for dns in &node.dns {
        if *dns != node.name {
            sans.push(SanType::DnsName(dns.clone().try_into().map_err(gen_err)?));
        }
    }
    params.subject_alt_names = sans;
    set_validity(&mut params, NODE_CERT_VALIDITY);
    Ok(params)
}

fn new_key(what: &str) -> Result<KeyPair, PeerTlsError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| PeerTlsError::Generate {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// Loads the CA of `dir` and checks that it can issue: the key matches the certificate and the
/// certificate's subject is the one [`ca_params`] rebuilds.
fn load_ca(cert_path: &Path, key_path: &Path) -> Result<(KeyPair, RootCertStore), PeerTlsError> {
    let invalid = |path: &Path, reason: String| PeerTlsError::CaInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let key_bytes = read_capped(key_path)?;
    let key_pem = std::str::from_utf8(&key_bytes)
        .map_err(|_| invalid(key_path, "not UTF-8 text (expected PEM)".into()))?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PeerTlsError::InvalidKey {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let certs = read_certs(cert_path)?;
    if certs.len() != 1 {
        return Err(invalid(
            cert_path,
            format!("holds {} certificates, expected exactly one", certs.len()),
        ));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        let parsed =
            ParsedCertificate::try_from(&cert).map_err(|e| invalid(cert_path, e.to_string()))?;
        if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info().as_slice() {
            return Err(PeerTlsError::KeyMismatch {
                cert_file: cert_path.to_path_buf(),
                key_file: key_path.to_path_buf(),
            });
        }
        roots
            .add(cert)
            .map_err(|e| invalid(cert_path, e.to_string()))?;
    }
    // The node certificates' issuer must be byte for byte the CA's subject.
    let rebuilt = ca_params(&key)
        .self_signed(&key)
        .map_err(|e| PeerTlsError::Generate {
            what: "the CA's subject".into(),
            reason: e.to_string(),
        })?;
    let mut expected = RootCertStore::empty();
    expected
        .add(rebuilt.der().clone())
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    let same_subject = matches!(
        (roots.roots.first(), expected.roots.first()),
        (Some(a), Some(b)) if a.subject == b.subject
    );
    if !same_subject {
        return Err(invalid(
            cert_path,
            format!(
                "its subject is not \"O={ORGANIZATION}, CN={}\": only a CA made by \
                 `imagestream peer certs` can be reused to issue node certificates",
                ca_common_name(&CertificateParams::default(), &key)
            ),
        ));
    }
    Ok((key, roots))
}

/// Writes `contents` to `path` atomically with mode 0600: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), PeerTlsError> {
    let write_err = |source| PeerTlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // A leftover of an earlier run of this process id; create_new below never follows it.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask may only clear bits; make the mode exact.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

/// Writes (in `dir`, created 0700 if missing) `ca.pem` + `ca-key.pem` if absent (an existing
/// CA is reused: its key and cert are loaded), and for each node `NAME.pem` and `NAME-key.pem`
/// (replaced if present: a node is re-issued with a new key). Keys are ECDSA P-256; every file
/// has mode 0600 and is written atomically. Returns the paths written, CA first (if made).
///
/// Everything is made and checked (each node certificate verifies under the CA) before the
/// first file is written. Only a CA made by this function can be reused.
pub fn generate(dir: &Path, nodes: &[NodeSpec]) -> Result<Vec<PathBuf>, PeerTlsError> {
    if nodes.is_empty() {
        return Err(PeerTlsError::NoNodes);
    }
    let mut names = BTreeSet::new();
    for node in nodes {
        if !names.insert(node.name.as_str()) {
            return Err(PeerTlsError::DuplicateNode {
                name: node.name.clone(),
            });
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PeerTlsError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;

    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let exists = |p: &Path| {
        p.try_exists().map_err(|source| PeerTlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    // (path, contents) of every file to write, in order.
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let (ca_key, roots) = match (exists(&ca_cert_path)?, exists(&ca_key_path)?) {
        (true, true) => load_ca(&ca_cert_path, &ca_key_path)?,
        (false, false) => {
            let key = new_key("the CA key")?;
            let mut params = ca_params(&key);
            set_validity(&mut params, CA_VALIDITY);
            let cert = params
                .self_signed(&key)
                .map_err(|e| PeerTlsError::Generate {
                    what: "the CA certificate".into(),
                    reason: e.to_string(),
                })?;
            let mut roots = RootCertStore::empty();
            roots
                .add(cert.der().clone())
                .map_err(|e| PeerTlsError::CaInvalid {
                    path: ca_cert_path.clone(),
                    reason: e.to_string(),
                })?;
            files.push((ca_key_path.clone(), key.serialize_pem()));
            files.push((ca_cert_path.clone(), cert.pem()));
            (key, roots)
        }
        (true, false) => {
            return Err(PeerTlsError::CaIncomplete {
                present: ca_cert_path,
                missing: ca_key_path,
            })
        }
        (false, true) => {
            return Err(PeerTlsError::CaIncomplete {
                present: ca_key_path,
                missing: ca_cert_path,
            })
        }
    };
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let algs = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    let now = UnixTime::now();
    for node in nodes {
        let key = new_key(&format!("the key of node {}", node.name))?;
        let cert =
            node_params(node)?
                .signed_by(&key, &issuer)
                .map_err(|e| PeerTlsError::Generate {
                    what: format!("the certificate of node {}", node.name),
                    reason: e.to_string(),
                })?;
        // Check what peers will check: the chain (which also catches an expired CA) and the
        // node's addresses.
        let der = cert.der().clone();
        let check = |e: rustls::Error| PeerTlsError::CaInvalid {
            path: ca_cert_path.clone(),
            reason: format!(
                "the certificate issued to {} does not verify: {e}",
                node.name
            ),
        };
        let parsed = ParsedCertificate::try_from(&der).map_err(check)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], now, algs)
            .map_err(check)?;
        for ip in &node.ips {
            verify_server_name(&parsed, &ServerName::IpAddress((*ip).into())).map_err(check)?;
        }
        files.push((
            dir.join(format!("{}-key.pem", node.name)),
            key.serialize_pem(),
        ));
        files.push((dir.join(format!("{}.pem", node.name)), cert.pem()));
    }
    let mut written = Vec::with_capacity(files.len());
    for (path, contents) in files {
        write_atomic(&path, contents.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn node(spec: &str) -> NodeSpec {
        spec.parse().expect("valid node spec")
    }

    fn files(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca_file: dir.join(CA_CERT_FILE),
            cert_file: dir.join(format!("{name}.pem")),
            key_file: dir.join(format!("{name}-key.pem")),
        }
    }

    /// Result of one handshake attempt: (server side, client side).
    type Outcome = (Result<Vec<u8>, String>, Result<Vec<u8>, String>);

    /// Runs a server with `server` on 127.0.0.1 and connects with `client` to
    /// ServerName::IpAddress(127.0.0.1); each side sends a message and reads the other's.
    async fn handshake(server: Arc<ServerConfig>, client: ClientConfig) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = TlsAcceptor::from(server);
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() != Some(b"h2".as_slice()) {
                return Err(format!("server: unexpected ALPN {alpn:?}"));
            }
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok(buf.to_vec())
        });
        let connector = TlsConnector::from(Arc::new(client));
        let client_result = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let name = ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into());
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf.to_vec())
        }
        .await;
        let server_result = server_task
            .await
            .unwrap_or_else(|e| Err(format!("server task: {e}")));
        (server_result, client_result)
    }

    #[tokio::test]
    async fn handshake_between_two_nodes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let written = generate(
            &dir,
            &[
                node("node-a=127.0.0.1,node-a.lan"),
                node("node-b=127.0.0.1"),
            ],
        )
        .expect("generate");
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().and_then(|n| n.to_str()).unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "ca-key.pem",
                "ca.pem",
                "node-a-key.pem",
                "node-a.pem",
                "node-b-key.pem",
                "node-b.pem"
            ]
        );
        let server = server_config(&files(&dir, "node-a")).expect("server config");
        let client = client_config(&files(&dir, "node-b")).expect("client config");
        let (s, c) = handshake(server, client).await;
        assert_eq!(s.expect("server side"), b"ping");
        assert_eq!(c.expect("client side"), b"pong");
    }

    #[tokio::test]
    async fn client_of_another_ca_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
        generate(&ours, &[node("node-a=127.0.0.1")]).expect("generate ours");
        generate(&theirs, &[node("node-x=127.0.0.1")]).expect("generate theirs");
        let server = server_config(&files(&ours, "node-a")).expect("server config");
        // Trusts our CA (so it accepts the server) but presents a cert of the other CA.
        let mixed = TlsFiles {
            ca_file: ours.join(CA_CERT_FILE),
            ..files(&theirs, "node-x")
        };
        assert!(matches!(
            client_config(&mixed),
            Err(PeerTlsError::CertNotTrusted { .. })
        ));
        let provider = provider();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(read_roots(&ours.join(CA_CERT_FILE)).expect("roots"))
            .with_client_auth_cert(
                read_certs(&theirs.join("node-x.pem")).expect("cert"),
                read_key(&theirs.join("node-x-key.pem")).expect("key"),
            )
            .expect("client config");
        let (s, c) = handshake(server, client).await;
        let err = s.expect_err("server must refuse a client of another CA");
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(c.is_err(), "client must see the refusal: {c:?}");
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        generate(&dir, &[node("node-a=127.0.0.1")]).expect("generate");
        let server = server_config(&files(&dir, "node-a")).expect("server config");
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(read_roots(&dir.join(CA_CERT_FILE)).expect("roots"))
            .with_no_client_auth();
        let (s, c) = handshake(server, client).await;
        let err = s.expect_err("server must refuse an anonymous client");
        assert!(err.contains("no certificates"), "{err}");
        assert!(c.is_err(), "client must see the refusal: {c:?}");
    }

    #[tokio::test]
    async fn client_trusting_another_ca_refuses_the_server() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
        generate(&ours, &[node("node-a=127.0.0.1")]).expect("generate ours");
        generate(&theirs, &[node("node-x=127.0.0.1")]).expect("generate theirs");
        let server = server_config(&files(&ours, "node-a")).expect("server config");
        let client = client_config(&files(&theirs, "node-x")).expect("client config");
        let (s, c) = handshake(server, client).await;
        let err = c.expect_err("client must refuse a server of another CA");
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(s.is_err(), "{s:?}");
    }

    #[tokio::test]
    async fn server_must_name_the_dialled_address() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        generate(&dir, &[node("node-a=10.9.9.9"), node("node-b=127.0.0.1")]).expect("generate");
        let server = server_config(&files(&dir, "node-a")).expect("server config");
        let client = client_config(&files(&dir, "node-b")).expect("client config");
        let (_, c) = handshake(server, client).await;
        let err = c.expect_err("127.0.0.1 is not in node-a's certificate");
        assert!(err.contains("not valid for name"), "{err}");
    }

    #[test]
    fn files_are_private_and_the_ca_is_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let first = generate(&dir, &[node("node-a=10.0.0.1")]).expect("generate");
        let dir_mode = std::fs::metadata(&dir).expect("dir").mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        for path in &first {
            let mode = std::fs::metadata(path).expect("metadata").mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let ca_before = std::fs::read(dir.join(CA_CERT_FILE)).expect("ca");
        let ca_key_before = std::fs::read(dir.join(CA_KEY_FILE)).expect("ca key");
        let second = generate(&dir, &[node("node-b=10.0.0.2")]).expect("second generate");
        assert_eq!(second, [dir.join("node-b-key.pem"), dir.join("node-b.pem")]);
        assert_eq!(
            std::fs::read(dir.join(CA_CERT_FILE)).expect("ca"),
            ca_before
        );
        assert_eq!(
            std::fs::read(dir.join(CA_KEY_FILE)).expect("ca key"),
            ca_key_before
        );
        // Both nodes verify under the one CA.
        client_config(&files(&dir, "node-a")).expect("node-a");
        server_config(&files(&dir, "node-b")).expect("node-b");
        // No temporary files left.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("read dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn bad_files_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        generate(&dir, &[node("node-a=10.0.0.1"), node("node-b=10.0.0.2")]).expect("generate");
        // Key of another node.
        let swapped = TlsFiles {
            key_file: dir.join("node-b-key.pem"),
            ..files(&dir, "node-a")
        };
        match server_config(&swapped) {
            Err(PeerTlsError::KeyMismatch { key_file, .. }) => {
                assert_eq!(key_file, dir.join("node-b-key.pem"))
            }
            other => panic!("expected KeyMismatch, got {other:?}"),
        }
        // A cert where the key should be, and a missing file.
        let no_key = TlsFiles {
            key_file: dir.join("node-a.pem"),
            ..files(&dir, "node-a")
        };
        assert!(matches!(
            client_config(&no_key),
            Err(PeerTlsError::NoPrivateKey { .. })
        ));
        let missing = TlsFiles {
            ca_file: dir.join("nope.pem"),
            ..files(&dir, "node-a")
        };
        let err = server_config(&missing).expect_err("missing CA");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        // A key where the cert should be.
        let no_cert = TlsFiles {
            cert_file: dir.join("node-a-key.pem"),
            ..files(&dir, "node-a")
        };
        assert!(matches!(
            server_config(&no_cert),
            Err(PeerTlsError::NoCertificate { .. })
        ));
        // Too large.
        let big = dir.join("big.pem");
        std::fs::write(&big, vec![b'x'; MAX_PEM_BYTES as usize + 1]).expect("write");
        let too_big = TlsFiles {
            ca_file: big,
            ..files(&dir, "node-a")
        };
        assert!(matches!(
            server_config(&too_big),
            Err(PeerTlsError::TooLarge { .. })
        ));
        // A CA with only one of its two files.
        std::fs::remove_file(dir.join(CA_KEY_FILE)).expect("rm");
        assert!(matches!(
            generate(&dir, &[node("node-c=10.0.0.3")]),
            Err(PeerTlsError::CaIncomplete { .. })
        ));
        // A CA key that is not the CA certificate's.
        std::fs::copy(dir.join("node-a-key.pem"), dir.join(CA_KEY_FILE)).expect("cp");
        assert!(matches!(
            generate(&dir, &[node("node-c=10.0.0.3")]),
            Err(PeerTlsError::KeyMismatch { .. })
        ));
        assert!(!dir.join("node-c.pem").exists());
    }

    #[test]
    fn a_foreign_ca_is_not_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = new_key("test CA").expect("key");
        let mut params = ca_params(&key);
        params.distinguished_name = subject("some other CA");
        let cert = params.self_signed(&key).expect("self-signed");
        std::fs::write(tmp.path().join(CA_CERT_FILE), cert.pem()).expect("write");
        std::fs::write(tmp.path().join(CA_KEY_FILE), key.serialize_pem()).expect("write");
        match generate(tmp.path(), &[node("node-a=10.0.0.1")]) {
            Err(e @ PeerTlsError::CaInvalid { .. }) => {
                assert!(e.to_string().contains("ca.pem"), "{e}")
            }
            other => panic!("expected CaInvalid, got {other:?}"),
        }
        assert!(!tmp.path().join("node-a.pem").exists());
    }

    #[test]
    fn generate_refuses_bad_node_lists() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            generate(tmp.path(), &[]),
            Err(PeerTlsError::NoNodes)
        ));
        assert!(matches!(
            generate(tmp.path(), &[node("a=10.0.0.1"), node("a=10.0.0.2")]),
            Err(PeerTlsError::DuplicateNode { .. })
        ));
        assert!(!tmp.path().join(CA_CERT_FILE).exists());
    }

    #[test]
    fn node_spec_parsing() {
        assert_eq!(
            node("node-a=10.0.0.1,node-a.lan, fd00::1,Node-A.Example.com,10.0.0.1"),
            NodeSpec {
                name: "node-a".into(),
                ips: vec![
                    "10.0.0.1".parse().expect("ip"),
                    "fd00::1".parse().expect("ip")
                ],
                dns: vec!["node-a.lan".into(), "node-a.example.com".into()],
            }
        );
        for bad in [
            "node-a",                                // no '='
            "=10.0.0.1",                             // empty name
            "Node-A=10.0.0.1",                       // uppercase name
            "node_a=10.0.0.1",                       // '_'
            "-node=10.0.0.1",                        // leading '-'
            "node-=10.0.0.1",                        // trailing '-'
            &format!("{}=10.0.0.1", "a".repeat(64)), // too long
            "ca=10.0.0.1",                           // collides with the CA's files
            "node-key=10.0.0.1",                     // collides with node's key file
            "node-a=",                               // empty address
            "node-a=10.0.0.1,,10.0.0.2",             // empty entry
            "node-a=node-a.lan",                     // no IP
            "node-a=10.0.0.1,bad_name.lan",          // invalid DNS name
            "node-a=10.0.0.1,-x.lan",                // invalid DNS label
            "node-a=10.0.0.1,a..b",                  // empty label
            "node-a=10.0.0.300",                     // a DNS name, so no IP
        ] {
            match bad.parse::<NodeSpec>() {
                Err(PeerTlsError::NodeSpec { spec, reason }) => {
                    assert_eq!(spec, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?}: expected a NodeSpec error, got {other:?}"),
            }
        }
    }
}
