//! Keyslot areas: encrypted with the keyslot's cipher in 512-byte sectors whose IVs count from 0
//! at the start of the area (as cryptsetup writes them). The cipher itself is the crypt
//! target's (`stackbd_targets::crypt::cipher`). Pure CPU on caller-owned buffers.

use super::{LuksError, SECTOR};
use stackbd_targets::crypt::cipher::{CipherSpec, SectorCipher};

fn cipher(encryption: &str, key: &[u8]) -> Result<SectorCipher, LuksError> {
    let err = |reason: String| LuksError::Cipher {
        cipher: encryption.to_string(),
        reason,
    };
    let spec = CipherSpec::parse(encryption).map_err(err)?;
    spec.check_key_len(key.len()).map_err(err)?;
    SectorCipher::new(&spec, key, SECTOR as usize).map_err(err)
}

/// Checks that `encryption` is a cipher the crypt target can run with a `key_len`-byte key.
pub(crate) fn check_cipher(encryption: &str, key_len: usize) -> Result<(), LuksError> {
    let err = |reason: String| LuksError::Cipher {
        cipher: encryption.to_string(),
        reason,
    };
    let spec = CipherSpec::parse(encryption).map_err(err)?;
    spec.check_key_len(key_len).map_err(err)
}

/// Decrypts a keyslot area in place (`buf.len()` a multiple of 512).
pub(crate) fn decrypt(encryption: &str, key: &[u8], buf: &mut [u8]) -> Result<(), LuksError> {
    debug_assert_eq!(buf.len() % SECTOR as usize, 0);
    cipher(encryption, key)?
        .try_decrypt(0, 1, buf)
        .map_err(|e| LuksError::Cipher {
            cipher: encryption.to_string(),
            reason: format!("decrypting the keyslot area: {e:?}"),
        })
}

/// Encrypts a keyslot area in place (`buf.len()` a multiple of 512).
pub(crate) fn encrypt(encryption: &str, key: &[u8], buf: &mut [u8]) -> Result<(), LuksError> {
    debug_assert_eq!(buf.len() % SECTOR as usize, 0);
    cipher(encryption, key)?
        .try_encrypt(0, 1, buf)
        .map_err(|e| LuksError::Cipher {
            cipher: encryption.to_string(),
            reason: format!("encrypting the keyslot area: {e:?}"),
        })
}
