//! The control API client behind `pvstack ctl`: sends one request line
//! and reads one response line, of bounded length within a deadline.

use std::io::{BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::line::{read_line, DeadlineStream, Line};
use super::protocol::{Request, Response};
use crate::error::{Error, Result};

/// How long to wait for the whole response. A swap waits for the old
/// backend's requests to complete, so this is generous.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest response line read: far more than any response of API
/// version 1 (an `info` of the most devices a VM can have is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Sends `request` to the API at `socket` and returns its response.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let io_error = |action: &'static str| {
        move |source| Error::File {
            action,
            path: socket.to_path_buf(),
            cause: source,
        }
    };
    let mut stream = UnixStream::connect(socket).map_err(io_error("connect to the API socket"))?;
    stream
        .set_write_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(io_error("set a timeout on the API socket"))?;
    let mut line = serde_json::to_vec(request).map_err(|e| Error::Api(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(io_error("send a request to the API socket"))?;
    let mut reader = BufReader::new(DeadlineStream::new(stream));
    let reply = match read_line(&mut reader, MAX_RESPONSE_BYTES, RESPONSE_TIMEOUT) {
        Ok(Line::Complete(reply)) => reply,
        Ok(Line::End) => {
            return Err(Error::Api(format!(
                "{} closed the connection without a response",
                socket.display()
            )))
        }
        Ok(Line::TooLong) => {
            return Err(Error::Api(format!(
                "{} sent a response longer than {MAX_RESPONSE_BYTES} bytes; refused",
                socket.display()
            )))
        }
        Err(e) if e.kind() == ErrorKind::TimedOut => {
            return Err(Error::Api(format!(
                "{} sent no complete response within {} s",
                socket.display(),
                RESPONSE_TIMEOUT.as_secs()
            )))
        }
        Err(e) => return Err(io_error("read the response from the API socket")(e)),
    };
    serde_json::from_slice(&reply).map_err(|e| {
        // Quote only the start of what came: it is the peer's, of any length.
        let shown: String = String::from_utf8_lossy(&reply).chars().take(200).collect();
        Error::Api(format!("unreadable response {shown:?}: {e}"))
    })
}
