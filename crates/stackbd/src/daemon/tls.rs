//! TLS for the NBD server: the `--tls*` options, the TLS context built from them once at start,
//! the identity of a client (its certificate's CN, or its PSK username) and the exports'
//! allow-lists.
//!
//! Why OpenSSL (through the `openssl` crate) and not rustls: NBD peers (qemu, nbdkit, libnbd,
//! all GnuTLS) use TLS-PSK as well as x509, and rustls has no external-PSK support in its
//! stable API (neither TLS 1.3 external PSKs nor the TLS 1.2 PSK suites). One TLS stack for both
//! keeps one state machine in the frontend and the leaf; OpenSSL is already linked (crypt's
//! `openssl-sys`), so this adds no C library.
//!
//! The handshake runs on the reactor, non-blocking, like the rest of the connection (see
//! `nbd.rs`): `STARTTLS` comes in the middle of option haggling, so the connection is already
//! on its reactor, and the NBD handshake deadline bounds the TLS handshake too.

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::nid::Nid;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslRef, SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;
use stackbd_nbd::server::TlsPolicy;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use zeroize::Zeroizing;

/// `--tls`: whether clients must, may or cannot use TLS.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS (`STARTTLS` is refused).
    Off,
    /// TLS for clients that ask; plain text for the others (exports with an allow-list need
    /// TLS all the same).
    On,
    /// TLS only: a client that does not start TLS gets `NBD_REP_ERR_TLS_REQD` and nothing else.
    Require,
}

/// `serve`'s TLS options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// off, on or require; `require` when credentials are given and this is not.
    #[arg(long, value_enum)]
    pub tls: Option<TlsMode>,
    /// Server certificate chain (PEM), with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are checked against.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Refuse a client without a certificate signed by --tls-ca.
    #[arg(long, requires = "tls_ca")]
    pub tls_verify_peer: bool,
    /// Pre-shared keys, `username:hexkey` per line (GnuTLS psktool's format, as nbdkit and
    /// qemu-nbd read it).
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// EXPORT=ID[,ID...]: only these client identities (certificate CN or PSK username) may
    /// see or open EXPORT, over TLS only. Repeatable.
    #[arg(long = "tls-allow", value_name = "EXPORT=IDS", value_parser = parse_allow)]
    pub tls_allow: Vec<(String, Vec<String>)>,
    /// The context built from these options (once, at start).
    #[arg(skip)]
    pub built: TlsSlot,
}

/// The TLS context, built once and shared by every listener.
#[derive(Clone, Default)]
pub struct TlsSlot(Arc<OnceLock<Option<Arc<TlsServer>>>>);

impl std::fmt::Debug for TlsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSlot")
    }
}

fn parse_allow(s: &str) -> Result<(String, Vec<String>), String> {
    let (export, ids) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected EXPORT=ID[,ID...]"))?;
    let ids: Vec<String> = ids
        .split(',')
        .filter(|i| !i.is_empty())
        .map(str::to_string)
        .collect();
    if export.is_empty() || ids.is_empty() {
        return Err(format!("'{s}': expected EXPORT=ID[,ID...]"));
    }
    Ok((export.to_string(), ids))
}

impl TlsArgs {
    /// The mode in force: `--tls`, else `require` with credentials and `off` without.
    pub fn mode(&self) -> TlsMode {
        self.tls
            .unwrap_or(if self.tls_cert.is_some() || self.tls_psk.is_some() {
                TlsMode::Require
            } else {
                TlsMode::Off
            })
    }

    /// The TLS context (`None` with `--tls off`), built on the first call; an error names the
    /// option and file at fault.
    pub fn server(&self) -> Result<Option<Arc<TlsServer>>, String> {
        if let Some(s) = self.built.0.get() {
            return Ok(s.clone());
        }
        let s = TlsServer::build(self)?.map(Arc::new);
        let _ = self.built.0.set(s.clone());
        Ok(s)
    }
}

/// Every client identity that may use an export, by export name.
type AllowLists = BTreeMap<String, Vec<String>>;

/// The server's TLS context and policy.
pub struct TlsServer {
    ctx: SslContext,
    policy: TlsPolicy,
    allow: AllowLists,
    /// Where the PSK callback leaves the client's username.
    psk_identity: Index<Ssl, String>,
}

impl TlsServer {
    fn build(a: &TlsArgs) -> Result<Option<TlsServer>, String> {
        let mode = a.mode();
        let creds = a.tls_cert.is_some() || a.tls_psk.is_some();
        if mode == TlsMode::Off {
            if creds || !a.tls_allow.is_empty() {
                return Err("--tls off with TLS credentials or --tls-allow: drop one".into());
            }
            return Ok(None);
        }
        if !creds {
            return Err(format!(
                "--tls {}: give --tls-cert and --tls-key, or --tls-psk",
                if mode == TlsMode::On { "on" } else { "require" }
            ));
        }
        let ssl_err = |what: &str, p: &Path, e: ErrorStack| format!("{what} {}: {e}", p.display());
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(|e| e.to_string())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(|e| e.to_string())?;
        // Forward-secret AEAD suites, with and without a certificate (PSK).
        b.set_cipher_list(
            "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-PSK+CHACHA20:DHE-PSK+AESGCM:ECDHE-PSK+AES:\
             PSK+AESGCM",
        )
        .map_err(|e| e.to_string())?;
        if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
            b.set_certificate_chain_file(cert)
                .map_err(|e| ssl_err("--tls-cert", cert, e))?;
            b.set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| ssl_err("--tls-key", key, e))?;
            b.check_private_key()
                .map_err(|e| format!("--tls-key does not match --tls-cert: {e}"))?;
        }
        if let Some(ca) = &a.tls_ca {
            b.set_ca_file(ca).map_err(|e| ssl_err("--tls-ca", ca, e))?;
            let names = openssl::x509::X509Name::load_client_ca_file(ca)
                .map_err(|e| ssl_err("--tls-ca", ca, e))?;
            b.set_client_ca_list(names);
            b.set_verify(if a.tls_verify_peer {
                SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
            } else {
                SslVerifyMode::PEER
            });
        }
        let psk_identity = Ssl::new_ex_index::<String>().map_err(|e| e.to_string())?;
        if let Some(p) = &a.tls_psk {
            let keys = read_psk_file(p)?;
            let idx = psk_identity;
            b.set_psk_server_callback(move |ssl, id, out| {
                let Some(user) = id.and_then(|i| std::str::from_utf8(i).ok()) else {
                    return Ok(0);
                };
                match keys.get(user) {
                    Some(k) if k.len() <= out.len() => {
                        out[..k.len()].copy_from_slice(k);
                        ssl.set_ex_data(idx, user.to_string());
                        Ok(k.len())
                    }
                    // Unknown username: the handshake fails.
                    _ => Ok(0),
                }
            });
        }
        let policy = if mode == TlsMode::On {
            TlsPolicy::On
        } else {
            TlsPolicy::Require
        };
        Ok(Some(TlsServer {
            ctx: b.build(),
            policy,
            allow: a.tls_allow.iter().cloned().collect(),
            psk_identity,
        }))
    }

    /// What the NBD codec does about `STARTTLS`.
    pub fn policy(&self) -> TlsPolicy {
        self.policy
    }

    /// A fresh TLS session for one connection.
    pub fn session(&self) -> Result<Ssl, ErrorStack> {
        Ssl::new(&self.ctx)
    }

    /// Who the client proved to be: its PSK username, or the CN of a certificate that
    /// verified against `--tls-ca`.
    pub fn identity(&self, ssl: &SslRef) -> Option<String> {
        if let Some(u) = ssl.ex_data(self.psk_identity) {
            return Some(u.clone());
        }
        let cert = ssl.peer_certificate()?;
        if ssl.verify_result() != X509VerifyResult::OK {
            return None;
        }
        let cn = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
        // The raw bytes: a CN with a NUL in it is nobody's.
        let cn = std::str::from_utf8(cn.data().as_slice()).ok()?;
        (!cn.contains('\0')).then(|| cn.to_string())
    }

    /// Whether a client with `identity` (`None`: plain text, or TLS without a verified one) may
    /// see and open `export`.
    pub fn allows(&self, export: &str, identity: Option<&str>) -> bool {
        match self.allow.get(export) {
            None => true,
            Some(ids) => identity.is_some_and(|i| ids.iter().any(|a| a == i)),
        }
    }
}

/// Reads a GnuTLS psktool file: `username:hexkey` lines (blank lines and `#` comments allowed).
pub fn read_psk_file(p: &Path) -> Result<HashMap<String, Zeroizing<Vec<u8>>>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(p).map_err(|e| format!("--tls-psk {}: {e}", p.display()))?,
    );
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("--tls-psk {} line {}: {why}", p.display(), n + 1);
        let (user, hex) = line
            .split_once(':')
            .ok_or_else(|| bad("expected username:hexkey"))?;
        if user.is_empty() {
            return Err(bad("empty username"));
        }
        let key = decode_hex(hex).ok_or_else(|| bad("the key is not hexadecimal"))?;
        if key.is_empty() || key.len() > 256 {
            return Err(bad("the key must be 1 to 256 bytes"));
        }
        keys.insert(user.to_string(), key);
    }
    if keys.is_empty() {
        return Err(format!("--tls-psk {}: no keys", p.display()));
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let mut v = Zeroizing::new(Vec::with_capacity(s.len() / 2));
    for pair in s.as_bytes().chunks(2) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        v.push((hi * 16 + lo) as u8);
    }
    Some(v)
}

/// Failed TLS handshakes so far: logged on powers of two, so a flood does not flood the log.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Logs a failed TLS handshake (rate-limited).
pub fn log_failure(why: &dyn std::fmt::Display) {
    let n = FAILED.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(failed = n, "NBD TLS handshake failed: {why}");
        eprintln!("stackbd: NBD TLS handshake failed ({n} so far): {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, "# keys\nalice:00ff10\n\nbob:ABCD\n").unwrap();
        let k = read_psk_file(&p).unwrap();
        assert_eq!(k["alice"].as_slice(), &[0, 255, 16]);
        assert_eq!(k["bob"].as_slice(), &[0xab, 0xcd]);
        for (text, want) in [
            ("alice", "line 1: expected"),
            (":00", "empty username"),
            ("a:0g", "hexadecimal"),
            ("a:123", "hexadecimal"),
            ("", "no keys"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_psk_file(&p).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn allow_lists_parse() {
        assert_eq!(
            parse_allow("demo=alice,bob").unwrap(),
            ("demo".into(), vec!["alice".into(), "bob".into()])
        );
        assert!(parse_allow("demo").is_err());
        assert!(parse_allow("=a").is_err());
        assert!(parse_allow("demo=").is_err());
    }

    #[test]
    fn mode_defaults_to_require_with_credentials() {
        let mut a = TlsArgs::default();
        assert_eq!(a.mode(), TlsMode::Off);
        assert!(a.server().unwrap().is_none());
        a.tls_psk = Some("/nonexistent".into());
        assert_eq!(a.mode(), TlsMode::Require);
        let a = TlsArgs {
            tls: Some(TlsMode::Require),
            ..TlsArgs::default()
        };
        let e = a.server().err().expect("no credentials");
        assert!(e.contains("--tls-cert"), "{e}");
    }
}
