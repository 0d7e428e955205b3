//! The LUKS anti-forensic information splitter (LUKS1 spec §2.4, LUKS2 `af.type = "luks1"`).
//!
//! A key of `n` bytes is stored as `stripes` blocks of `n` bytes: all but the last are random,
//! the last is the key XOR the running diffusion of the others. The diffusion function hashes
//! each hash-sized piece of a block together with its big-endian index, keeping as many bytes
//! of the digest as the piece is long. Pure CPU; the caller owns (and zeroes) the buffers.

use super::kdf::HashAlg;
use zeroize::Zeroizing;

/// Replaces `block` by its diffusion under `hash`.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let step = hash.output_len();
    for (i, piece) in block.chunks_mut(step).enumerate() {
        // Blocks are at most a few KiB, so the piece index fits in 32 bits.
        let index = (i as u32).to_be_bytes();
        let (mut out, _) = hash.hash(&[&index, piece]);
        let n = piece.len();
        piece.copy_from_slice(&out[..n]);
        zeroize::Zeroize::zeroize(&mut out[..]);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= *s;
    }
}

/// Merges `split` (`stripes` blocks of `key_len` bytes) back into the key. The caller checks
/// `split.len() == key_len * stripes` and `stripes >= 1`.
pub(crate) fn merge(hash: HashAlg, split: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    let mut blocks = split.chunks_exact(key_len);
    let stripes = blocks.len();
    for _ in 1..stripes {
        if let Some(b) = blocks.next() {
            xor_into(&mut acc, b);
            diffuse(hash, &mut acc);
        }
    }
    if let Some(last) = blocks.next() {
        xor_into(&mut acc, last);
    }
    acc
}

/// Splits `key` into `stripes` blocks, the first `stripes - 1` filled by `random` (the OS RNG in
/// production). Allocates `key.len() * stripes` bytes, zeroed on drop.
pub(crate) fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    random: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let n = key.len();
    let total = n.checked_mul(stripes).ok_or("AF size overflows")?;
    if stripes == 0 || n == 0 {
        return Err("AF split of an empty key or into 0 stripes".into());
    }
    let mut out = Zeroizing::new(vec![0u8; total]);
    let last = total - n;
    random(&mut out[..last])?;
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for block in out[..last].chunks_exact(n) {
        xor_into(&mut acc, block);
        diffuse(hash, &mut acc);
    }
    xor_into(&mut acc, key);
    out[last..].copy_from_slice(&acc);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_round_trips() {
        let key: Vec<u8> = (0..64u8).collect();
        let mut seed = 7u8;
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            for stripes in [1usize, 2, 3, 4000] {
                let s = split(hash, &key, stripes, |b| {
                    for x in b.iter_mut() {
                        seed = seed.wrapping_mul(31).wrapping_add(17);
                        *x = seed;
                    }
                    Ok(())
                })
                .unwrap();
                assert_eq!(&merge(hash, &s, key.len())[..], &key[..]);
            }
        }
    }

    #[test]
    fn one_stripe_is_the_key_and_diffusion_changes_every_piece() {
        let key = [0x5au8; 70];
        let s = split(HashAlg::Sha256, &key, 1, |_| Ok(())).unwrap();
        assert_eq!(&s[..], &key[..]);
        // Two zero stripes: the last one is key XOR diffuse(0); every 32-byte piece (and the
        // short tail) must differ from the key.
        let s = split(HashAlg::Sha256, &key, 2, |b| {
            b.fill(0);
            Ok(())
        })
        .unwrap();
        let last = &s[70..];
        for (a, b) in last.chunks(32).zip(key.chunks(32)) {
            assert_ne!(a, b);
        }
    }
}
