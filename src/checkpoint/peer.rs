//! A checkpoint fetched from a peer replica (`GET /v1/models/{name}/checkpoint`,
//! the same encoding and checksum as the stores), for a replica whose own
//! store holds none: a fleet on directory stores can add a replica after the
//! update log's start has moved past 0. Plain HTTP/1.1 over std, for peers
//! inside the cluster.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;

use super::decode;
use crate::model::Model;
use crate::state::ReplicaState;

/// How long connecting to and reading from a peer may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// The newest checkpoint of the replica at `base_url` (`http://host:port`),
/// verified (checksum, format, model fingerprint) against `model`.
pub fn fetch(base_url: &str, model: &Model) -> anyhow::Result<ReplicaState> {
    let authority = base_url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .with_context(|| format!("bootstrap peer {base_url:?}: expected http://host:port"))?;
    let path = format!("/v1/models/{}/checkpoint", model.config().name);
    let addr = (authority.to_socket_addrs())
        .with_context(|| format!("bootstrap peer {authority:?}: not a host:port"))?
        .next()
        .with_context(|| format!("bootstrap peer {authority:?}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, PEER_TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(PEER_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("reading {base_url}{path}"))?;
    let body = response_body(&raw).with_context(|| format!("GET {base_url}{path}"))?;
    Ok(decode(model, body, &format!("{base_url}{path}"))?)
}

/// The body of a whole HTTP/1.1 response with a `Content-Length` (axum
/// answers a byte body so), or why not.
fn response_body(raw: &[u8]) -> anyhow::Result<&[u8]> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let (head, body) = (std::str::from_utf8(&raw[..split])?, &raw[split + 4..]);
    let status = head.split(' ').nth(1).context("no status")?;
    if status != "200" {
        anyhow::bail!("status {status}: {}", String::from_utf8_lossy(body));
    }
    let length = (head.lines())
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .context("no Content-Length")?;
    anyhow::ensure!(body.len() == length, "{} of {length} bytes arrived", body.len());
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::response_body;

    #[test]
    fn a_whole_response_gives_its_body_and_anything_else_an_error() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(response_body(ok).unwrap(), b"abc");
        assert!(response_body(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc").is_err(), "short");
        let missing = response_body(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno").unwrap_err();
        assert!(missing.to_string().contains("404"), "{missing}");
    }
}
