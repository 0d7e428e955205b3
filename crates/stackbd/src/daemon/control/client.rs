//! [`Client`]: the client end of the control socket, for the CLI and tests. No verbs live here.

use super::VERSION;
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A connection to the control socket, for the CLI and tests.
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        Client::from_stream(UnixStream::connect(path)?)
    }

    /// Connects after checking the socket's directory, the socket and the daemon's credentials
    /// ([`super::super::trust::connect_trusted`]); every refusal says why.
    pub fn connect_trusted(path: &Path) -> Result<Client, String> {
        let s = super::super::trust::connect_trusted(path)?;
        Client::from_stream(s).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_stream(s: UnixStream) -> std::io::Result<Client> {
        Ok(Client {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// Sends `{"v":1,"cmd":cmd,...args}` and returns the reply object as it came (check `ok`).
    pub fn call(&mut self, cmd: &str, args: Value) -> std::io::Result<Value> {
        Ok(self.call_raw(cmd, args)?.1)
    }

    /// As [`Client::call`], with the reply line exactly as the daemon sent it.
    pub fn call_raw(&mut self, cmd: &str, args: Value) -> std::io::Result<(String, Value)> {
        let mut req = match args {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        req.insert("v".into(), json!(VERSION));
        req.insert("cmd".into(), json!(cmd));
        self.exchange(&Value::Object(req).to_string())
    }

    /// Sends one raw line (a newline is added) and reads one reply line.
    pub fn send_line(&mut self, line: &str) -> std::io::Result<Value> {
        Ok(self.exchange(line)?.1)
    }

    fn exchange(&mut self, line: &str) -> std::io::Result<(String, Value)> {
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        let sent = self.w.write_all(&buf).and_then(|()| self.w.flush());
        let mut reply = String::new();
        // A daemon that refuses a connection (another user, too many connections) says why in
        // one line and closes at once, perhaps before the request is written: read that line.
        let got = self.r.read_line(&mut reply);
        if let Err(e) = sent {
            if reply.trim().is_empty() {
                return Err(e);
            }
        }
        if got? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without replying",
            ));
        }
        let v = serde_json::from_str(&reply).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("malformed reply from the daemon: {e}"),
            )
        })?;
        Ok((reply.trim_end().to_string(), v))
    }

    /// Waits until the daemon closes the connection (after `shutdown`); false on timeout.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let _ = self.r.get_ref().set_read_timeout(Some(timeout));
        let mut rest = Vec::new();
        self.r.read_to_end(&mut rest).is_ok()
    }
}
