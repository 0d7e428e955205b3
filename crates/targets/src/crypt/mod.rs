//! `crypt`: dm-crypt's transparent sector encryption (work in progress: the cipher first).

pub mod cipher;
mod ossl;
