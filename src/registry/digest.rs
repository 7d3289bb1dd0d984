//! Content digests: `sha256:` and 64 lowercase hex digits, checked before a digest names a file
//! on disk or goes into a URL.

use sha2::{Digest as _, Sha256};
use std::fmt;

/// A validated `sha256:<64 lowercase hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `s`, naming it in the error when it is not a sha256 digest.
    pub fn parse(s: &str) -> Result<Self, String> {
        super::check_sha256_digest(s)?;
        Ok(Self(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The digest a finished hasher stands for.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// The 64 hex digits (a file name in the content store).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_hash() {
        let d = Digest::of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(d.as_str()), Ok(d.clone()));
        assert_eq!(d.hex().len(), 64);
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
        assert!(Digest::parse("md5:abc").is_err());
    }
}
