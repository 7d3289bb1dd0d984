//! Cosign signature artifacts as a registry gives them (`src/signature`): the simple-signing
//! payload (`parse_payload`), a signature manifest's signature layers
//! (`fetch::signature_layers`), a referrers index's cosign signatures
//! (`fetch::signature_referrers`), a trusted key's PEM (`TrustedKey::from_pem`), and `verify`
//! of a payload and its base64 signature against a fixed digest under two fixed trusted keys
//! (ECDSA P-256, whose private key is here too, and P-384).
//!
//! Input: the whole input is read as a payload, a manifest, an index and a PEM; for `verify` it
//! is split at its last 0xFF byte (found in neither JSON nor base64) into the payload and the
//! signature (lossy UTF-8; no 0xFF: the whole input is the payload and the signature is empty).
//!
//! Invariants: nothing panics; the caps hold (at most `MAX_SIGNATURE_LAYERS` layers, at most
//! `MAX_REFERRERS` referrers, payloads over `MAX_PAYLOAD_BYTES` refused); every digest handed
//! on is a valid sha256 digest; `verify` never accepts unless the payload parses as a cosign
//! payload naming the digest; and the payload signed here with the trusted P-256 key is
//! accepted exactly when it parses and names the digest (otherwise refused for the payload,
//! never for the key).
#![no_main]

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use base64::Engine as _;
use imagestream::registry::Digest;
use imagestream::signature::fetch::{
    signature_layers, signature_referrers, MAX_REFERRERS, MAX_SIGNATURE_LAYERS,
};
use imagestream::signature::{
    parse_payload, verify, SignatureError, TrustedKey, MAX_PAYLOAD_BYTES,
};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The digest every signature is checked against (the seeds' payloads name it).
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A fixed ECDSA P-256 key pair (PKCS#8 DER, base64; `openssl ecparam -name prime256v1
/// -genkey | openssl pkcs8 -topk8 -nocrypt -outform DER`): fixed, so that the signature in the
/// seed `valid-signed` stays valid.
const P256_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg7Tx3dcbo/bVxKXKrLFSPb3Xa3oP/c9dMNCMvL7kCXwWhRANCAAROctxOO5qfr6fLrZZrxaBcwtydfaAMd8CNxtkR8qFuQEGn+d2Mgblxq/xnvv8Po6Qisw3dCkRfdx+GjciTVoyR";

/// A second trusted key (P-384, public only): `verify` tries every key.
const P384_PEM: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEWli1+6k8P0R69OFQYAoA/yoHIw89/Uqz
3FNM7Jab5MXmpmY8/IvoyPDchup33V4bXct4tyDs12QP3AqtyE4XrwywxiLjzlWS
CJup5nxAJ1FHpCUPPjSFyaNSLSVxZ8Eg
-----END PUBLIC KEY-----
";

struct Fixed {
    signer: EcdsaKeyPair,
    keys: Vec<TrustedKey>,
    digest: Digest,
    rng: SystemRandom,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let b64 = base64::engine::general_purpose::STANDARD;
        let pkcs8 = b64.decode(P256_PKCS8).expect("P256_PKCS8 is base64");
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8)
            .expect("P256_PKCS8 is a P-256 key");
        let der = signer.public_key().as_der().expect("public key DER");
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            b64.encode(der.as_ref())
        );
        let keys = vec![
            TrustedKey::from_pem("fuzz-p256.pub", pem.as_bytes()).expect("P-256 key"),
            TrustedKey::from_pem("fuzz-p384.pub", P384_PEM.as_bytes()).expect("P-384 key"),
        ];
        Fixed {
            signer,
            keys,
            digest: Digest::parse(DIGEST).expect("DIGEST"),
            rng: SystemRandom::new(),
        }
    })
}

fn assert_digest(d: &Digest) {
    assert!(d.as_str().starts_with("sha256:"), "{d}");
    assert_eq!(d.hex().len(), 64, "{d}");
    assert!(d
        .hex()
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
}

/// Whether `payload` is one a correct signature of it must be accepted for: it parses and
/// names [`DIGEST`].
fn names_digest(payload: &[u8]) -> bool {
    parse_payload(payload).is_ok_and(|p| p.manifest_digest == DIGEST)
}

fuzz_target!(|data: &[u8]| {
    let f = fixed();

    // The payload parser.
    match parse_payload(data) {
        Ok(p) => {
            assert!(data.len() <= MAX_PAYLOAD_BYTES);
            let d = Digest::parse(&p.manifest_digest)
                .unwrap_or_else(|e| panic!("accepted payload names no digest: {e}"));
            assert_digest(&d);
        }
        Err(SignatureError::PayloadTooLarge { size }) => {
            assert!(size > MAX_PAYLOAD_BYTES && size == data.len())
        }
        Err(SignatureError::BadPayload { .. }) => {}
        Err(e) => panic!("parse_payload: unexpected error {e:?}"),
    }

    // A signature manifest's layers.
    if let Ok(layers) = signature_layers(data) {
        assert!(
            !layers.is_empty() && layers.len() <= MAX_SIGNATURE_LAYERS,
            "{} signature layers",
            layers.len()
        );
        for l in &layers {
            assert_digest(&l.digest);
        }
    }

    // A referrers index's cosign signatures.
    if let Ok(referrers) = signature_referrers(data) {
        assert!(
            referrers.len() <= MAX_REFERRERS,
            "{} referrers",
            referrers.len()
        );
        for d in &referrers {
            assert_digest(d);
        }
    }

    // A key file.
    if let Ok(key) = TrustedKey::from_pem("input.pub", data) {
        assert!(key.id().starts_with("sha256:") && key.id().len() == 71);
    }

    // `verify` of the input's payload and signature.
    let (payload, signature) = match data.iter().rposition(|&b| b == 0xFF) {
        Some(i) => (&data[..i], String::from_utf8_lossy(&data[i + 1..])),
        None => (data, "".into()),
    };
    match verify(payload, &signature, &f.keys, &f.digest) {
        Ok(key) => {
            assert!(
                names_digest(payload),
                "verify accepted a payload that does not name {DIGEST}"
            );
            assert!(f.keys.iter().any(|k| k.id() == key.id()));
        }
        Err(SignatureError::NoKeys) => panic!("verify: no keys, with two"),
        Err(_) => {}
    }
    assert_eq!(
        verify(payload, &signature, &[], &f.digest).err(),
        Some(SignatureError::NoKeys)
    );

    // The same payload with a correct signature by the trusted P-256 key: accepted exactly when
    // the payload is right; refused for the payload, never for the key or the encoding.
    let signed = f.signer.sign(&f.rng, payload).expect("sign");
    let signed = base64::engine::general_purpose::STANDARD.encode(signed.as_ref());
    match verify(payload, &signed, &f.keys, &f.digest) {
        Ok(key) => {
            assert!(
                names_digest(payload),
                "accepted a payload not naming {DIGEST}"
            );
            assert_eq!(key.name(), "fuzz-p256.pub");
        }
        Err(e) => {
            assert!(!names_digest(payload), "refused a correct signature: {e}");
            assert!(
                matches!(
                    e,
                    SignatureError::PayloadTooLarge { .. }
                        | SignatureError::BadPayload { .. }
                        | SignatureError::PayloadDigestDiffers { .. }
                ),
                "a correct signature refused with {e:?}"
            );
        }
    }
});
