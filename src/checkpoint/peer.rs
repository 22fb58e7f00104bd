//! A checkpoint fetched from a peer replica (`GET /v1/models/{name}/checkpoint`,
//! the same encoding and checksum as the stores), for a replica whose own
//! store holds none: a fleet on directory stores can add a replica after the
//! update log's start has moved past 0. Plain HTTP/1.1 over std, for peers
//! inside the cluster.
//!
//! The peer is trusted no further than the bytes show: the request carries
//! the fleet's `checkpoint.peer_token`; an answer longer than the model's
//! largest checkpoint is refused before its body is read, and its body is
//! read as it arrives, never allocated from what the headers declare; the
//! whole fetch has one deadline, which a peer that trickles bytes cannot
//! extend; and the body must carry a valid checksum and this model's
//! settings.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::format::{decode, largest_size};
use crate::model::Model;
use crate::state::ReplicaState;

/// How long the whole fetch may take: connecting, the headers and the body.
const PEER_DEADLINE: Duration = Duration::from_secs(300);
/// The most bytes of a response's status line and headers.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// The newest checkpoint of the replica at `base_url` (`http://host:port`),
/// asked for with the bearer `token` (none if empty), verified (size,
/// checksum, format, model settings) against `model`.
pub fn fetch(base_url: &str, token: &str, model: &Model) -> anyhow::Result<ReplicaState> {
    let deadline = Instant::now() + PEER_DEADLINE;
    let authority = base_url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .with_context(|| format!("bootstrap peer {base_url:?}: expected http://host:port"))?;
    let path = format!("/v1/models/{}/checkpoint", model.config().name);
    let url = format!("{base_url}{path}");
    let addr = (authority.to_socket_addrs())
        .with_context(|| format!("bootstrap peer {authority:?}: not a host:port"))?
        .next()
        .with_context(|| format!("bootstrap peer {authority:?}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, PEER_DEADLINE).with_context(|| format!("connecting to {addr}"))?;
    let auth = if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Connection: close\r\n\r\n")?;
    let mut reader = BufReader::new(Deadlined { stream, deadline });
    let (status, length) = read_head(&mut reader).with_context(|| format!("GET {url}"))?;
    let largest = largest_size(model);
    if status != 200 {
        let mut why = Vec::new();
        reader.take(MAX_HEAD_BYTES as u64).read_to_end(&mut why)?;
        anyhow::bail!("GET {url}: status {status}: {}", String::from_utf8_lossy(&why));
    }
    anyhow::ensure!(
        length <= largest,
        "GET {url}: a body of {length} bytes, over the {largest} bytes this model's checkpoint can take"
    );
    let body = read_body(&mut reader, length).with_context(|| format!("reading {url}"))?;
    Ok(decode(model, &body, &url)?)
}

/// A stream whose every read must end by `deadline`.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer's deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// The status and `Content-Length` of a response, its head read up to the
/// blank line (at most [`MAX_HEAD_BYTES`]).
fn read_head(reader: &mut impl BufRead) -> anyhow::Result<(u16, u64)> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let read = reader.take((MAX_HEAD_BYTES - head.len()) as u64).read_until(b'\n', &mut head)?;
        anyhow::ensure!(read > 0, "the response ended inside its headers");
        anyhow::ensure!(head.len() < MAX_HEAD_BYTES, "headers over {MAX_HEAD_BYTES} bytes");
    }
    let head = std::str::from_utf8(&head).context("headers not UTF-8")?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status")?;
    let length = (head.lines())
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok());
    match (status, length) {
        (200, None) => anyhow::bail!("no Content-Length"),
        (_, length) => Ok((status, length.unwrap_or(0))),
    }
}

/// Exactly `length` bytes of body, the buffer growing only as they arrive.
fn read_body(reader: &mut impl Read, length: u64) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(length.min(1 << 20) as usize);
    reader.take(length).read_to_end(&mut body)?;
    anyhow::ensure!(body.len() as u64 == length, "{} of {length} bytes arrived", body.len());
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn a_whole_response_gives_its_body_and_anything_else_an_error() {
        let mut ok = Cursor::new(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc".to_vec());
        assert_eq!(read_head(&mut ok).unwrap(), (200, 3));
        assert_eq!(read_body(&mut ok, 3).unwrap(), b"abc");
        let mut short = Cursor::new(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc".to_vec());
        let length = read_head(&mut short).unwrap().1;
        assert!(read_body(&mut short, length).is_err(), "short");
        let mut missing = Cursor::new(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno".to_vec());
        assert_eq!(read_head(&mut missing).unwrap().0, 404);
        let no_length = read_head(&mut Cursor::new(b"HTTP/1.1 200 OK\r\n\r\nabc".to_vec())).unwrap_err();
        assert!(no_length.to_string().contains("Content-Length"), "{no_length}");
    }

    #[test]
    fn a_declared_length_is_never_allocated_before_the_bytes_arrive() {
        let (_, peak) = crate::alloc_meter::measure(256 << 20, || read_body(&mut Cursor::new(b"abc"), 1 << 40));
        assert!(peak <= 2 << 20, "{peak} bytes held for 3 bytes declared as a terabyte");
        let endless_head = vec![b'x'; 1 << 20];
        let err = read_head(&mut Cursor::new(endless_head)).unwrap_err();
        assert!(err.to_string().contains("headers over"), "{err}");
    }
}
