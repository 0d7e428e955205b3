//! The hashes and KDFs LUKS names, by name, from RustCrypto crates: PBKDF2-HMAC over SHA-1 and
//! SHA-2, argon2i and argon2id, and plain hashing for the AF diffuser and the LUKS2 checksum.
//! Pure CPU; argon2 allocates its memory.

use super::{LuksError, MAX_ARGON2_MEMORY_KIB};
use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// A hash LUKS may name (`hashSpec`, `af.hash`, a digest's or pbkdf2's `hash`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// Parses a hash name as cryptsetup writes it (case-insensitive).
    pub(crate) fn parse(name: &str) -> Result<HashAlg, String> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => {
                return Err(format!(
                    "hash {name:?} is not supported (sha1, sha224, sha256, sha384, sha512 are)"
                ))
            }
        })
    }

    /// The output length in bytes.
    pub(crate) fn output_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The hash of the concatenation of `parts`, into a buffer of [`HashAlg::output_len`] bytes
    /// (64 at most).
    pub(crate) fn hash(self, parts: &[&[u8]]) -> ([u8; 64], usize) {
        fn run<D: Digest>(parts: &[&[u8]]) -> ([u8; 64], usize) {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            let out = d.finalize();
            let mut buf = [0u8; 64];
            buf[..out.len()].copy_from_slice(&out);
            (buf, out.len())
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub(crate) fn pbkdf2(
        self,
        password: &[u8],
        salt: &[u8],
        iterations: u32,
        out: &mut [u8],
    ) -> Result<(), LuksError> {
        if iterations == 0 {
            return Err(LuksError::Kdf {
                kdf: "pbkdf2".into(),
                reason: "0 iterations".into(),
            });
        }
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2::pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2::pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
        Ok(())
    }

    /// The name cryptsetup writes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }
}

/// Argon2 flavour of a LUKS2 keyslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Argon2Variant {
    /// `argon2i`.
    Argon2i,
    /// `argon2id`.
    Argon2id,
}

impl Argon2Variant {
    /// The name in LUKS2 JSON.
    pub fn name(self) -> &'static str {
        match self {
            Argon2Variant::Argon2i => "argon2i",
            Argon2Variant::Argon2id => "argon2id",
        }
    }
}

/// Argon2 (version 1.3, no secret, no associated data, as LUKS2 uses it), filling `out`.
/// Allocates `memory_kib` KiB.
pub(crate) fn argon2(
    variant: Argon2Variant,
    password: &[u8],
    salt: &[u8],
    time: u32,
    memory_kib: u32,
    lanes: u32,
    out: &mut [u8],
) -> Result<(), LuksError> {
    let err = |reason: String| LuksError::Kdf {
        kdf: variant.name().into(),
        reason,
    };
    if memory_kib > MAX_ARGON2_MEMORY_KIB {
        return Err(err(format!(
            "memory {memory_kib} KiB is more than the maximum {MAX_ARGON2_MEMORY_KIB} KiB"
        )));
    }
    let params = argon2::Params::new(memory_kib, time, lanes, Some(out.len())).map_err(|e| {
        err(format!(
            "time {time}, memory {memory_kib} KiB, threads {lanes}: {e}"
        ))
    })?;
    let alg = match variant {
        Argon2Variant::Argon2i => argon2::Algorithm::Argon2i,
        Argon2Variant::Argon2id => argon2::Algorithm::Argon2id,
    };
    argon2::Argon2::new(alg, argon2::Version::V0x13, params)
        .hash_password_into(password, salt, out)
        .map_err(|e| err(e.to_string()))
}

/// Constant-time equality of two byte strings (lengths compared first, not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6070 test vector 2 (PBKDF2-HMAC-SHA1, 2 iterations).
    #[test]
    fn pbkdf2_sha1_vector() {
        let mut out = [0u8; 20];
        HashAlg::Sha1
            .pbkdf2(b"password", b"salt", 2, &mut out)
            .unwrap();
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }

    #[test]
    fn bad_names_and_params() {
        assert!(HashAlg::parse("whirlpool").is_err());
        assert_eq!(HashAlg::parse("SHA256").unwrap(), HashAlg::Sha256);
        let mut out = [0u8; 32];
        assert!(HashAlg::Sha256.pbkdf2(b"p", b"s", 0, &mut out).is_err());
        assert!(argon2(
            Argon2Variant::Argon2id,
            b"p",
            b"saltsalt",
            1,
            1,
            1,
            &mut out
        )
        .is_err());
        assert!(argon2(
            Argon2Variant::Argon2id,
            b"p",
            b"saltsalt",
            1,
            u32::MAX,
            1,
            &mut out
        )
        .is_err());
        assert!(argon2(
            Argon2Variant::Argon2id,
            b"p",
            b"saltsalt",
            0,
            64,
            1,
            &mut out
        )
        .is_err());
    }
}
