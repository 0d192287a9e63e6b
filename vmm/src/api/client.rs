//! The control API client behind `pvstack ctl`: sends one request line
//! and reads one response line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{Request, Response};
use crate::error::{Error, Result};

/// How long to wait for a response. A swap waits for the old backend's
/// requests to complete, so this is generous.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

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
        .set_read_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(io_error("set a timeout on the API socket"))?;
    let mut line = serde_json::to_vec(request).map_err(|e| Error::Api(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(io_error("send a request to the API socket"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(io_error("read the response from the API socket"))?;
    if reply.is_empty() {
        return Err(Error::Api(format!(
            "{} closed the connection without a response",
            socket.display()
        )));
    }
    serde_json::from_str(&reply)
        .map_err(|e| Error::Api(format!("unreadable response {:?}: {e}", reply.trim_end())))
}
