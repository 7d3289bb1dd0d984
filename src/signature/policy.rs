//! A signature policy (a stream's own, or the node's default from the config) and the record
//! of a verification that each pinned generation keeps.
//!
//! - `enforce`: a digest enters a stream only if a signature by a trusted key verifies, and a
//!   pod runs a stream tag only if its current generation is recorded as verified by a key
//!   the policy still trusts ([`SignaturePolicy::refuses`]).
//! - `warn`: every digest is pinned; one that does not verify is recorded as such, logged,
//!   counted and shown in its tag event.
//! - `off`: nothing is checked (a stream's `off` also overrides the node's default).
//!
//! Keys are kept in the stream record itself (PEM, a few hundred bytes each), so that a
//! cluster's nodes all check against the same keys without sharing files.

use super::{SignatureError, TrustedKey};
use serde::{Deserialize, Serialize};

/// Most keys a policy may trust: a team's CI key and a few rotations, not a keyring.
pub const MAX_POLICY_KEYS: usize = 16;

/// How strictly a policy is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Warn,
    #[default]
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Warn => "warn",
            Mode::Off => "off",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "warn" => Ok(Mode::Warn),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "invalid signature policy mode {other:?}: enforce, warn or off"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A trusted cosign public key as a policy keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyKey {
    /// Where it came from (the file name given to `stream policy --key`).
    pub name: String,
    /// `sha256:` of its DER encoding.
    pub id: String,
    /// `ecdsa-p256`, `ecdsa-p384`, `ecdsa-p521` or `rsa`.
    pub algorithm: String,
    /// The PEM text.
    pub pem: String,
}

/// What a stream (or the node) trusts, and how strictly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignaturePolicy {
    pub mode: Mode,
    #[serde(default)]
    pub keys: Vec<PolicyKey>,
}

impl SignaturePolicy {
    /// A policy from `(name, PEM)` keys, each checked. `enforce` and `warn` need at least one
    /// key; at most [`MAX_POLICY_KEYS`].
    pub fn new(mode: Mode, keys: &[(String, Vec<u8>)]) -> Result<Self, SignatureError> {
        if keys.len() > MAX_POLICY_KEYS {
            return Err(SignatureError::Key {
                name: format!("{} keys", keys.len()),
                reason: format!("a policy trusts at most {MAX_POLICY_KEYS} keys"),
            });
        }
        if mode != Mode::Off && keys.is_empty() {
            return Err(SignatureError::NoKeys);
        }
        let mut out: Vec<PolicyKey> = Vec::new();
        for (name, pem) in keys {
            let key = TrustedKey::from_pem(name, pem)?;
            if out.iter().any(|k| k.id == key.id()) {
                continue;
            }
            let text = String::from_utf8(pem.clone()).map_err(|_| SignatureError::Key {
                name: name.clone(),
                reason: "not UTF-8 text".into(),
            })?;
            out.push(PolicyKey {
                name: name.clone(),
                id: key.id().to_string(),
                algorithm: key.algorithm().name().to_string(),
                pem: text,
            });
        }
        Ok(Self { mode, keys: out })
    }

    /// The keys, parsed for verification.
    pub fn trusted_keys(&self) -> Result<Vec<TrustedKey>, SignatureError> {
        self.keys
            .iter()
            .map(|k| TrustedKey::from_pem(&k.name, k.pem.as_bytes()))
            .collect()
    }

    /// Whether `verification` shows a signature by a key this policy trusts now.
    pub fn accepts(&self, verification: Option<&Verification>) -> bool {
        verification.is_some_and(|v| {
            v.status == Status::Verified && self.keys.iter().any(|k| k.id == v.key_id)
        })
    }

    /// Why a generation with `verification` may not run under this policy (`enforce` only):
    /// never checked, failed, or verified by a key no longer trusted.
    pub fn refuses(&self, verification: Option<&Verification>) -> Option<String> {
        if self.mode != Mode::Enforce || self.accepts(verification) {
            return None;
        }
        Some(match verification {
            None => "it was pinned before the policy applied and has not been verified".into(),
            Some(v) if v.status == Status::Verified => format!(
                "it was verified by key {} ({}), which the policy no longer trusts",
                v.key, v.key_id
            ),
            Some(v) => format!("its signature did not verify: {}", v.error),
        })
    }
}

/// Whether a verification succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Verified,
    Failed,
}

/// What a generation records of the check of its digest's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub status: Status,
    /// The policy's mode when it was checked.
    pub mode: Mode,
    /// The key that verified it (name and id), when verified.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// The signature manifest that verified it (`sha256:…`), kept and pinned in the cache.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
    /// Why it failed, when it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// RFC 3339, UTC.
    pub checked: String,
}

impl Verification {
    /// One line for listings: `verified (cosign.pub)`, `FAILED: …`.
    pub fn summary(&self) -> String {
        match self.status {
            Status::Verified => format!("verified ({})", self.key),
            Status::Failed => format!("unverified: {}", self.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem() -> Vec<u8> {
        use aws_lc_rs::encoding::AsDer as _;
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _};
        use base64::Engine as _;
        let pair = EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING)
            .expect("generate");
        let der = pair.public_key().as_der().expect("der");
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        )
        .into_bytes()
    }

    fn verified_by(id: &str) -> Verification {
        Verification {
            status: Status::Verified,
            mode: Mode::Enforce,
            key: "k.pub".into(),
            key_id: id.into(),
            signature: String::new(),
            error: String::new(),
            checked: "now".into(),
        }
    }

    #[test]
    fn modes_keys_and_refusals() {
        assert_eq!("enforce".parse::<Mode>(), Ok(Mode::Enforce));
        assert!("strict".parse::<Mode>().is_err());
        assert_eq!(
            SignaturePolicy::new(Mode::Enforce, &[]),
            Err(SignatureError::NoKeys)
        );
        assert!(SignaturePolicy::new(Mode::Off, &[]).is_ok());
        let a = pem();
        let p = SignaturePolicy::new(
            Mode::Enforce,
            &[("a.pub".into(), a.clone()), ("again.pub".into(), a)],
        )
        .expect("policy");
        assert_eq!(p.keys.len(), 1, "the same key twice is kept once");
        assert_eq!(p.trusted_keys().expect("keys").len(), 1);
        let id = p.keys[0].id.clone();
        assert!(p.refuses(Some(&verified_by(&id))).is_none());
        assert!(p
            .refuses(None)
            .expect("refused")
            .contains("not been verified"));
        assert!(p
            .refuses(Some(&verified_by("sha256:other")))
            .expect("refused")
            .contains("no longer trusts"));
        let warn = SignaturePolicy {
            mode: Mode::Warn,
            ..p.clone()
        };
        assert!(warn.refuses(None).is_none(), "warn never refuses");
        let many: Vec<(String, Vec<u8>)> = (0..=MAX_POLICY_KEYS)
            .map(|i| (format!("{i}.pub"), pem()))
            .collect();
        assert!(SignaturePolicy::new(Mode::Enforce, &many).is_err());
    }
}
