//! `Digest`: the content address of a component (`sha256:<64 hex>`). Everything the store keeps
//! by content is keyed by this type, so a digest is always parsed and lower-cased once, at the
//! edge, and bytes are only ever trusted after `Digest::verify` agreed with them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

#[derive(Debug, thiserror::Error)]
#[error("`{value}` is not a component digest: expected `sha256:` followed by 64 hex digits")]
pub struct DigestParseError {
    value: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The digest from a SHA-256 computed elsewhere (over bytes hashed as they arrived).
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest(hash)
    }

    /// Whether `bytes` hash to this digest.
    pub fn verify(&self, bytes: &[u8]) -> bool {
        Digest::of(bytes) == *self
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(value: &str) -> Result<Digest, DigestParseError> {
        let error = || DigestParseError {
            value: value.to_string(),
        };
        let hex_part = value.trim().strip_prefix("sha256:").ok_or_else(error)?;
        if hex_part.len() != 64 {
            return Err(error());
        }
        let bytes = hex::decode(hex_part.to_ascii_lowercase()).map_err(|_| error())?;
        Ok(Digest(bytes.try_into().map_err(|_| error())?))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_verifies() {
        let digest = Digest::of(b"abc");
        assert_eq!(
            digest.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(digest.to_string().parse::<Digest>().unwrap(), digest);
        assert!(digest.verify(b"abc"));
        assert!(!digest.verify(b"abd"));
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "sha256:",
            "sha256:zz",
            "md5:00",
            &"a".repeat(64),
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            let err = bad.parse::<Digest>().unwrap_err();
            assert!(err.to_string().contains("sha256:"), "{err}");
        }
        let upper = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(upper.parse::<Digest>().unwrap().hex(), "ab".repeat(32));
    }
}
