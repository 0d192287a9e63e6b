//! Reading one line of the control API from a socket with a deadline for
//! the whole line and a limit on its length, so that a peer trickling
//! bytes (each read within a per-read timeout) or sending without end
//! cannot hold the reader for ever or make it buffer without bound.

use std::io::{self, BufRead, BufReader, ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A socket whose reads fail with `TimedOut` once `deadline` has passed.
pub struct DeadlineStream {
    stream: UnixStream,
    deadline: Instant,
}

impl DeadlineStream {
    /// `stream`, with no time left until [`Self::set_deadline`].
    pub fn new(stream: UnixStream) -> Self {
        DeadlineStream {
            stream,
            deadline: Instant::now(),
        }
    }

    /// Reads fail from `within` from now.
    pub fn set_deadline(&mut self, within: Duration) {
        self.deadline = Instant::now() + within;
    }

    fn timed_out() -> io::Error {
        io::Error::new(ErrorKind::TimedOut, "the deadline for the line passed")
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Self::timed_out());
        }
        self.stream.set_read_timeout(Some(left))?;
        match self.stream.read(buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(Self::timed_out())
            }
            other => other,
        }
    }
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, without its `\n`.
    Complete(Vec<u8>),
    /// The peer closed the connection with nothing unread.
    End,
    /// More than the limit arrived before a `\n`.
    TooLong,
}

/// Where request lines come from: a socket with a deadline per line, or
/// bytes already in memory (the API fuzz target), which never wait.
pub trait LineSource: BufRead {
    /// The next line must be complete within `within` from now.
    fn start_line(&mut self, within: Duration);
}

impl LineSource for BufReader<DeadlineStream> {
    fn start_line(&mut self, within: Duration) {
        self.get_mut().set_deadline(within);
    }
}

impl LineSource for &[u8] {
    fn start_line(&mut self, _within: Duration) {}
}

/// Reads one `\n`-terminated line of at most `max` bytes (without the
/// `\n`) within `within` from now. A line the peer ends by closing the
/// connection counts as complete. Fails with `TimedOut` if the line is not
/// complete in time.
pub fn read_line(reader: &mut impl LineSource, max: usize, within: Duration) -> io::Result<Line> {
    reader.start_line(within);
    let mut line = Vec::new();
    let read = reader
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(Line::End);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Complete(line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (BufReader<DeadlineStream>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (BufReader::new(DeadlineStream::new(ours)), theirs)
    }

    #[test]
    fn lines_one_after_another_and_the_end() {
        let (mut reader, mut peer) = pair();
        peer.write_all(b"one\ntwo\nthree").unwrap();
        drop(peer);
        let second = Duration::from_secs(1);
        for expected in [&b"one"[..], b"two", b"three"] {
            let line = read_line(&mut reader, 16, second).unwrap();
            assert_eq!(line, Line::Complete(expected.to_vec()));
        }
        assert_eq!(read_line(&mut reader, 16, second).unwrap(), Line::End);
    }

    #[test]
    fn a_line_over_the_limit_is_refused_unread() {
        let (mut reader, mut peer) = pair();
        peer.write_all(&[b'x'; 100]).unwrap();
        let line = read_line(&mut reader, 16, Duration::from_secs(1)).unwrap();
        assert_eq!(line, Line::TooLong);
    }

    #[test]
    fn a_trickled_line_times_out_as_a_whole() {
        let (mut reader, peer) = pair();
        let trickler = std::thread::spawn(move || {
            // One byte every 10 ms: each read waits far less than the
            // deadline, the line as a whole takes longer.
            for _ in 0..100 {
                if (&peer).write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let err = read_line(&mut reader, 1024, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut);
        drop(reader);
        trickler.join().unwrap();
    }
}
