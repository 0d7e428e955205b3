//! TLS to the NBD server (`nbds://`, `nbds+unix://`): what the URI and the leaf's parameters
//! say (libnbd's URI parameters: `tls-certificates=DIR`, `tls-psk-file=FILE`, `tls-username=`
//! or `user@host`, `tls-verify-peer=false`), `NBD_OPT_STARTTLS`, and the TLS session. Blocking,
//! on connector threads and probes only; the reactor then reads and writes through the session
//! without blocking (`Stream::Tls`).
//!
//! OpenSSL (the `openssl` crate) rather than rustls: rustls cannot do TLS-PSK, which qemu-nbd and
//! nbdkit offer (`--tls-psk`), and one TLS stack serves both the daemon and this leaf.

use super::wire::{read_vec, remaining, Stream};
use super::{invalid_input, protocol, NbdAddr};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslStream};
use openssl::ssl::{SslFiletype, SslVerifyMode, SslVersion};
use stackbd_nbd::{encode_option, Opt, OptionReply, OptionReplyHeader};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How the leaf authenticates itself and the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsClient {
    /// `ca-cert.pem` (to check the server), and optionally `client-cert.pem` and
    /// `client-key.pem` (to be checked by it), as libnbd, qemu and nbdkit lay them out. Without
    /// it (and without a PSK) the system's CAs check the server.
    pub certificates: Option<PathBuf>,
    /// GnuTLS psktool file (`username:hexkey` lines).
    pub psk_file: Option<PathBuf>,
    /// The PSK username (the URI's `user@`, or `tls-username=`).
    pub username: Option<String>,
    /// Check the server's certificate (default true; `tls-verify-peer=false` only for tests).
    pub verify_peer: bool,
}

impl TlsClient {
    /// Takes one URI query parameter; false if it is not a TLS one.
    pub(super) fn param(&mut self, key: &str, value: &str) -> io::Result<bool> {
        match key {
            "tls-certificates" => self.certificates = Some(PathBuf::from(value)),
            "tls-psk-file" => self.psk_file = Some(PathBuf::from(value)),
            "tls-username" => self.username = Some(value.to_string()),
            "tls-verify-peer" => {
                self.verify_peer = match value {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(invalid_input(format!("tls-verify-peer={value}"))),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks what only makes sense together (a PSK file needs a username).
    pub fn check(&self) -> io::Result<()> {
        match (&self.psk_file, &self.username) {
            (Some(_), None) => Err(invalid_input(
                "tls-psk-file needs a username (nbds://USER@host/... or tls-username=USER)",
            )),
            _ => Ok(()),
        }
    }

    fn context(&self) -> io::Result<SslContext> {
        let ssl = |what: &str, p: &Path, e: openssl::error::ErrorStack| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} {}: {e}", p.display()),
            )
        };
        let other = |e: openssl::error::ErrorStack| io::Error::other(e.to_string());
        let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(other)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(other)?;
        // Always check a certificate the server sends: with a PSK none should come, and one that
        // does (a server that ignored the PSK) fails against an empty CA list.
        b.set_verify(if self.verify_peer {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        if let Some(p) = &self.psk_file {
            let user = self.username.clone().unwrap_or_default();
            let key = read_psk(p, &user)?;
            b.set_cipher_list("ECDHE-PSK+CHACHA20:DHE-PSK+AESGCM:ECDHE-PSK+AES:PSK+AESGCM")
                .map_err(other)?;
            b.set_psk_client_callback(move |_, _hint, id, psk| {
                // The identity is NUL-terminated.
                if user.len() >= id.len() || key.len() > psk.len() {
                    return Ok(0);
                }
                id[..user.len()].copy_from_slice(user.as_bytes());
                id[user.len()] = 0;
                psk[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
        } else if let Some(d) = &self.certificates {
            let ca = d.join("ca-cert.pem");
            b.set_ca_file(&ca).map_err(|e| ssl("CA", &ca, e))?;
            let (cert, key) = (d.join("client-cert.pem"), d.join("client-key.pem"));
            if cert.exists() {
                b.set_certificate_chain_file(&cert)
                    .map_err(|e| ssl("client certificate", &cert, e))?;
                b.set_private_key_file(&key, SslFiletype::PEM)
                    .map_err(|e| ssl("client key", &key, e))?;
            }
        } else {
            b.set_default_verify_paths().map_err(other)?;
        }
        Ok(b.build())
    }
}

/// The key of `user` in a psktool file.
fn read_psk(p: &Path, user: &str) -> io::Result<zeroize::Zeroizing<Vec<u8>>> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(p)
            .map_err(|e| io::Error::new(e.kind(), format!("tls-psk-file {}: {e}", p.display())))?,
    );
    for line in text.lines() {
        if let Some(hex) = line
            .trim()
            .strip_prefix(user)
            .and_then(|r| r.strip_prefix(':'))
        {
            let mut key = zeroize::Zeroizing::new(Vec::with_capacity(hex.len() / 2));
            let digits: Option<Vec<u32>> = hex.chars().map(|c| c.to_digit(16)).collect();
            match digits {
                Some(d) if d.len().is_multiple_of(2) && !d.is_empty() => {
                    key.extend(d.chunks(2).map(|p| (p[0] * 16 + p[1]) as u8))
                }
                _ => {
                    return Err(invalid_input(format!(
                        "tls-psk-file {}: the key of '{user}' is not hexadecimal",
                        p.display()
                    )))
                }
            }
            return Ok(key);
        }
    }
    Err(invalid_input(format!(
        "tls-psk-file {}: no key for '{user}'",
        p.display()
    )))
}

/// `NBD_OPT_STARTTLS` then the TLS handshake, on a blocking stream after the client flags;
/// all by `deadline`.
pub(super) fn starttls(
    mut s: Stream,
    addr: &NbdAddr,
    tls: &TlsClient,
    deadline: Instant,
) -> io::Result<Stream> {
    let ctx = tls.context()?;
    let mut out = Vec::with_capacity(16);
    encode_option(&mut out, Opt::StartTls, &[]).map_err(protocol)?;
    s.write_all_by(&out, deadline)?;
    let h = read_vec(&mut s, OptionReplyHeader::SIZE, deadline)?;
    let (hdr, _) = OptionReplyHeader::decode(&h, 64 * 1024)
        .map_err(protocol)?
        .ok_or_else(|| protocol("short option reply"))?;
    let data = read_vec(&mut s, hdr.length as usize, deadline)?;
    match OptionReply::parse(&hdr, &data).map_err(protocol)? {
        OptionReply::Ack if hdr.option == Opt::StartTls => {}
        OptionReply::Error { error, message } => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "NBD server refused STARTTLS: {error:?} {}",
                    String::from_utf8_lossy(message)
                ),
            ))
        }
        other => return Err(protocol(format!("unexpected reply to STARTTLS: {other:?}"))),
    }
    let other = |e: openssl::error::ErrorStack| io::Error::other(e.to_string());
    let mut ssl = Ssl::new(&ctx).map_err(other)?;
    if let NbdAddr::Tcp(hp) = addr {
        // The server's name (or address) must be in its certificate.
        let host = hp
            .rsplit_once(':')
            .map_or(hp.as_str(), |h| h.0)
            .trim_start_matches('[')
            .trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ssl.param_mut().set_ip(ip).map_err(other)?,
            Err(_) => {
                ssl.set_hostname(host).map_err(other)?;
                ssl.param_mut().set_host(host).map_err(other)?;
            }
        }
    }
    s.set_timeouts(Some(remaining(deadline)?))?;
    let mut t = SslStream::new(ssl, s).map_err(other)?;
    match t.connect() {
        Ok(()) => Ok(Stream::Tls(Box::new(t))),
        Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
            // A socket timeout (SO_RCVTIMEO) says "would block".
            remaining(deadline)?;
            Err(super::wire::timed_out())
        }
        Err(e) => {
            let v = t.ssl().verify_result();
            let why = if v == openssl::x509::X509VerifyResult::OK {
                e.to_string()
            } else {
                format!("{e} ({})", v.error_string())
            };
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("TLS handshake failed: {why}"),
            ))
        }
    }
}
