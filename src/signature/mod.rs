//! Cosign signatures: the signature policy of streams (issue 21).
//!
//! # Layout
//! - this file: the verification core: trusted keys ([`TrustedKey`]), the simple-signing
//!   payload ([`parse_payload`]) and [`verify`] (one signature, one payload, one digest);
//! - [`policy`]: what a stream (or the node's default) trusts and how strictly
//!   ([`policy::SignaturePolicy`]), and what each pinned generation records
//!   ([`policy::Verification`]);
//! - [`fetch`]: finding a digest's signatures (the `sha256-<hex>.sig` tag, the OCI 1.1
//!   referrers API) through an [`fetch::ArtifactSource`] (the node cache, so that they are kept
//!   and pinned with the image) and verifying them ([`fetch::Verifier`]).
//!
//! What cosign signs (its `specs/SIGNATURE_SPEC.md`, "simple signing"): a small JSON payload
//! whose `critical.image.docker-manifest-digest` names the image digest, stored as a layer of
//! the signature manifest; the signature (base64, in the layer's
//! `dev.cosignproject.cosign/signature` annotation) is over the payload's **raw bytes**, which
//! are therefore never re-serialised here.
//!
//! Keys are cosign public keys (`cosign.pub`: PEM `PUBLIC KEY`, SubjectPublicKeyInfo), parsed
//! and checked by sigstore-rs (`sigstore::crypto::CosignVerificationKey`, on aws-lc-rs):
//! ECDSA P-256 (what `cosign generate-key-pair` makes), P-384 and P-521 with ASN.1 DER
//! signatures, and RSA with PKCS#1 v1.5 and SHA-256. Ed25519 keys are refused with a clear
//! error: cosign signs with them in the pre-hashed variant (Ed25519ph), which sigstore-rs's
//! verification key does not do (it verifies plain Ed25519). A key is known by its name (the file
//! it came from) and its id, `sha256:` of its DER encoding, which is what a verification
//! records: renaming a file does not un-verify anything, replacing the key does.
//!
//! A signature is accepted when it verifies under one of the trusted keys **and** its payload
//! names the digest being pinned; each way of failing is its own error.
//!
//! sigstore-rs is used for keys and signature checks only (no features): its OCI verification
//! (`cosign` feature) is built on oci-client 0.17, while this crate is on 0.18 (two registry
//! clients, two token caches), and keeps its signature-layer type crate-private. The payload
//! and signature manifest are read here with serde, capped, and fuzzed (`fuzz/`).

pub mod fetch;
pub mod policy;

use crate::registry::Digest;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::Deserialize;
use sigstore::crypto::{CosignVerificationKey, Signature as RawSignature};
use thiserror::Error;

/// Largest simple-signing payload accepted: cosign's are a few hundred bytes (the digest, the
/// reference and optional annotations); anything far larger is not a signature payload.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;
/// Largest base64 signature accepted: an RSA-8192 signature is 1,366 base64 characters.
pub const MAX_SIGNATURE_CHARS: usize = 2048;
/// Largest key file accepted.
pub const MAX_KEY_PEM_BYTES: usize = 16 << 10;
/// The `critical.type` of a cosign image signature.
pub const COSIGN_PAYLOAD_TYPE: &str = "cosign container image signature";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("key {name}: {reason}")]
    Key { name: String, reason: String },
    #[error("no trusted key is configured")]
    NoKeys,
    #[error("signature is not base64, or over {MAX_SIGNATURE_CHARS} characters")]
    SignatureEncoding,
    #[error("no trusted key matched the signature (tried {})", tried.join(", "))]
    NoTrustedKeyMatched { tried: Vec<String> },
    #[error("signature payload is {size} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")]
    PayloadTooLarge { size: usize },
    #[error("signature payload is not a cosign simple-signing payload: {reason}")]
    BadPayload { reason: String },
    #[error("the signature is for {signed}, not {expected}")]
    PayloadDigestDiffers { expected: String, signed: String },
}

/// The algorithm a trusted key verifies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    EcdsaP521,
    Rsa,
}

impl KeyAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::EcdsaP384 => "ecdsa-p384",
            KeyAlgorithm::EcdsaP521 => "ecdsa-p521",
            KeyAlgorithm::Rsa => "rsa",
        }
    }
}

/// A cosign public key the policy trusts, with the name it is reported by (its file name).
#[derive(Clone)]
pub struct TrustedKey {
    name: String,
    id: String,
    algorithm: KeyAlgorithm,
    key: CosignVerificationKey,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl TrustedKey {
    /// A key from PEM (`-----BEGIN PUBLIC KEY-----`, as `cosign.pub`), parsed and later used
    /// by sigstore-rs (`sigstore::crypto::CosignVerificationKey`): ECDSA P-256/P-384/P-521
    /// (ASN.1 signatures, SHA-256/384/512) or RSA (PKCS#1 v1.5, SHA-256, 2048 to 8192 bits).
    pub fn from_pem(name: &str, pem: &[u8]) -> Result<Self, SignatureError> {
        let bad = |reason: String| SignatureError::Key {
            name: name.to_string(),
            reason,
        };
        if pem.len() > MAX_KEY_PEM_BYTES {
            return Err(bad(format!("over {MAX_KEY_PEM_BYTES} bytes")));
        }
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|e| bad(format!("no PEM \"PUBLIC KEY\" block ({e})")))?;
        let key = CosignVerificationKey::try_from_der(spki.as_ref()).map_err(|e| {
            bad(format!(
                "not an ECDSA P-256/P-384/P-521 or RSA public key ({})",
                crate::audit::cap(e.to_string())
            ))
        })?;
        let algorithm = match &key {
            CosignVerificationKey::ECDSA_P256_SHA256_ASN1(_) => KeyAlgorithm::EcdsaP256,
            CosignVerificationKey::ECDSA_P384_SHA384_ASN1(_) => KeyAlgorithm::EcdsaP384,
            CosignVerificationKey::ECDSA_P521_SHA512_ASN1(_) => KeyAlgorithm::EcdsaP521,
            CosignVerificationKey::RSA_PKCS1_SHA256(_)
            | CosignVerificationKey::RSA_PSS_SHA256(_) => KeyAlgorithm::Rsa,
            CosignVerificationKey::ED25519(_) => {
                return Err(bad(
                    "Ed25519 keys are not supported: cosign signs with them as Ed25519ph; \
                     use an ECDSA P-256 key (cosign generate-key-pair)"
                        .into(),
                ))
            }
        };
        Ok(Self {
            name: name.to_string(),
            id: Digest::of(spki.as_ref()).to_string(),
            algorithm,
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sha256:<hex>` of the key's DER encoding (SubjectPublicKeyInfo).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.key
            .verify_signature(RawSignature::Raw(signature), message)
            .is_ok()
    }
}

/// What a verified payload says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// `critical.image.docker-manifest-digest`.
    pub manifest_digest: String,
    /// `critical.identity.docker-reference` (informational: cosign's spec does not bind it).
    pub reference: Option<String>,
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    #[serde(default)]
    identity: Option<Identity>,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference", default)]
    docker_reference: Option<String>,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// Parses a simple-signing payload (at most [`MAX_PAYLOAD_BYTES`]).
pub fn parse_payload(bytes: &[u8]) -> Result<Payload, SignatureError> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(SignatureError::PayloadTooLarge { size: bytes.len() });
    }
    let p: SimpleSigning =
        serde_json::from_slice(bytes).map_err(|e| SignatureError::BadPayload {
            reason: crate::audit::cap(e.to_string()),
        })?;
    if p.critical.kind != COSIGN_PAYLOAD_TYPE {
        return Err(SignatureError::BadPayload {
            reason: format!(
                "critical.type is {:?}, not {COSIGN_PAYLOAD_TYPE:?}",
                p.critical.kind.chars().take(100).collect::<String>()
            ),
        });
    }
    let digest = p.critical.image.docker_manifest_digest;
    if Digest::parse(&digest).is_err() {
        return Err(SignatureError::BadPayload {
            reason: format!(
                "critical.image.docker-manifest-digest {:?} is not a digest",
                digest.chars().take(100).collect::<String>()
            ),
        });
    }
    Ok(Payload {
        manifest_digest: digest,
        reference: p.critical.identity.and_then(|i| i.docker_reference),
    })
}

/// Verifies one cosign signature: `signature_b64` over the raw `payload` under one of `keys`,
/// and the payload naming `digest`. Returns the key that verified it.
pub fn verify<'k>(
    payload: &[u8],
    signature_b64: &str,
    keys: &'k [TrustedKey],
    digest: &Digest,
) -> Result<&'k TrustedKey, SignatureError> {
    if keys.is_empty() {
        return Err(SignatureError::NoKeys);
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(SignatureError::PayloadTooLarge {
            size: payload.len(),
        });
    }
    if signature_b64.len() > MAX_SIGNATURE_CHARS {
        return Err(SignatureError::SignatureEncoding);
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|_| SignatureError::SignatureEncoding)?;
    let Some(key) = keys.iter().find(|k| k.verifies(payload, &signature)) else {
        return Err(SignatureError::NoTrustedKeyMatched {
            tried: keys.iter().map(|k| k.name.clone()).collect(),
        });
    };
    let p = parse_payload(payload)?;
    if p.manifest_digest != digest.as_str() {
        return Err(SignatureError::PayloadDigestDiffers {
            expected: digest.to_string(),
            signed: p.manifest_digest,
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};

    fn pem_of(der: &[u8]) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out.into_bytes()
    }

    fn p256() -> (EcdsaKeyPair, Vec<u8>) {
        let pair = EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING)
            .expect("generate");
        let der = pair.public_key().as_der().expect("der").as_ref().to_vec();
        (pair, pem_of(&der))
    }

    fn payload(digest: &str) -> Vec<u8> {
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"127.0.0.1:5000/app"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        )
        .into_bytes()
    }

    fn sign(pair: &EcdsaKeyPair, message: &[u8]) -> String {
        let sig = pair.sign(&SystemRandom::new(), message).expect("sign");
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    }

    #[test]
    fn a_signature_over_the_digest_by_a_trusted_key_verifies() {
        let (pair, pem) = p256();
        let key = TrustedKey::from_pem("cosign.pub", &pem).expect("key");
        assert_eq!(key.algorithm(), KeyAlgorithm::EcdsaP256);
        let digest = Digest::of(b"manifest");
        let body = payload(digest.as_str());
        let sig = sign(&pair, &body);
        let keys = [key];
        let by = verify(&body, &sig, &keys, &digest).expect("verifies");
        assert_eq!(by.name(), "cosign.pub");
    }

    #[test]
    fn each_way_of_failing_is_named() {
        let (pair, pem) = p256();
        let (other, other_pem) = p256();
        let keys = [TrustedKey::from_pem("team.pub", &pem).expect("key")];
        let digest = Digest::of(b"manifest");
        let body = payload(digest.as_str());
        // Another key signed it.
        assert_eq!(
            verify(&body, &sign(&other, &body), &keys, &digest).err(),
            Some(SignatureError::NoTrustedKeyMatched {
                tried: vec!["team.pub".into()]
            })
        );
        // A signature over another digest.
        let elsewhere = payload(Digest::of(b"other").as_str());
        assert!(matches!(
            verify(&elsewhere, &sign(&pair, &elsewhere), &keys, &digest),
            Err(SignatureError::PayloadDigestDiffers { .. })
        ));
        // A tampered payload (one byte changed after signing).
        let sig = sign(&pair, &body);
        let mut tampered = body.clone();
        let i = tampered.len() - 3;
        tampered[i] ^= 1;
        assert!(matches!(
            verify(&tampered, &sig, &keys, &digest),
            Err(SignatureError::NoTrustedKeyMatched { .. })
        ));
        // A corrupted signature.
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&sig)
            .expect("b64");
        let j = raw.len() / 2;
        raw[j] ^= 0x40;
        let corrupt = base64::engine::general_purpose::STANDARD.encode(raw);
        assert!(matches!(
            verify(&body, &corrupt, &keys, &digest),
            Err(SignatureError::NoTrustedKeyMatched { .. })
        ));
        assert_eq!(
            verify(&body, "not base64!", &keys, &digest).err(),
            Some(SignatureError::SignatureEncoding)
        );
        assert_eq!(
            verify(&body, &sig, &[], &digest).err(),
            Some(SignatureError::NoKeys)
        );
        // Both keys trusted: the other one's signature verifies now.
        let both = [
            TrustedKey::from_pem("team.pub", &pem).expect("key"),
            TrustedKey::from_pem("ci.pub", &other_pem).expect("key"),
        ];
        let by = verify(&body, &sign(&other, &body), &both, &digest).expect("verifies");
        assert_eq!(by.name(), "ci.pub");
    }

    #[test]
    fn payloads_must_be_cosign_simple_signing_naming_a_digest() {
        let d = Digest::of(b"x");
        let p = parse_payload(&payload(d.as_str())).expect("parses");
        assert_eq!(p.manifest_digest, d.as_str());
        assert_eq!(p.reference.as_deref(), Some("127.0.0.1:5000/app"));
        for bad in [
            &b"{}"[..],
            b"null",
            b"[1,2]",
            br#"{"critical":{"image":{"docker-manifest-digest":"sha256:abc"},"type":"cosign container image signature"}}"#,
            br#"{"critical":{"image":{"docker-manifest-digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"type":"other"}}"#,
        ] {
            assert!(
                matches!(parse_payload(bad), Err(SignatureError::BadPayload { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert!(matches!(
            parse_payload(&huge),
            Err(SignatureError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn keys_are_checked_when_loaded() {
        let ed = Ed25519KeyPair::generate().expect("ed25519");
        let ed_pem = pem_of(ed.public_key().as_der().expect("der").as_ref());
        let e = TrustedKey::from_pem("ed.pub", &ed_pem).expect_err("ed25519 refused");
        assert!(e.to_string().contains("Ed25519ph"), "{e}");
        let e = TrustedKey::from_pem("junk.pub", b"hello").expect_err("not PEM");
        assert!(e.to_string().contains("junk.pub"), "{e}");
        let garbage = pem_of(b"\x30\x03\x02\x01\x00");
        assert!(TrustedKey::from_pem("g.pub", &garbage).is_err());
        let big = vec![b'a'; MAX_KEY_PEM_BYTES + 1];
        assert!(TrustedKey::from_pem("big.pub", &big).is_err());
    }
}
