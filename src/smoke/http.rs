//! HTTP checks, made by kiln itself over the host forward of user-mode
//! networking: one HTTP/1.0 GET, read to end of stream, no client crate.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cmd;
use crate::recipe::HttpCheck;

/// How long kiln keeps retrying a request that found nothing listening
/// (the service may still be binding its port).
pub const RETRY_WINDOW: Duration = Duration::from_secs(15);
/// Bound on one request: connect, send, read the whole answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Body bytes shown in a mismatch message.
const BODY_EXCERPT: usize = 200;

/// What a server answered.
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// A free TCP port on 127.0.0.1 for a host forward.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port on 127.0.0.1")?;
    Ok(listener
        .local_addr()
        .context("reading a bound socket's address")?
        .port())
}

/// Parse a raw HTTP/1.x response.
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    if raw.is_empty() {
        return Err("an empty response (connection closed)".into());
    }
    let text = String::from_utf8_lossy(raw);
    let (head, body) = match text.find("\r\n\r\n") {
        Some(at) => (&text[..at], &text[at + 4..]),
        None => match text.find("\n\n") {
            Some(at) => (&text[..at], &text[at + 2..]),
            None => (&text[..], ""),
        },
    };
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(status) if version.starts_with("HTTP/") => Ok(Response {
            status,
            body: body.to_owned(),
        }),
        _ => Err(format!("not an HTTP response: {:?}", excerpt(status_line))),
    }
}

/// One attempt: GET `path` from 127.0.0.1:`port`.
fn get_once(port: u16, path: &str) -> Result<Response, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
        .map_err(|e| format!("connection failed: {e}"))?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: kiln-smoke\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending the request failed: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("reading the response failed: {e}"))?;
    parse_response(&raw)
}

/// GET with retries while nothing answers; a real HTTP answer, whatever
/// its status, ends the retries. Inner `Err` is the last failure.
pub fn get(port: u16, path: &str) -> Result<Result<Response, String>> {
    let started = Instant::now();
    loop {
        cmd::check_interrupt()?;
        match get_once(port, path) {
            Ok(resp) => return Ok(Ok(resp)),
            Err(why) if started.elapsed() >= RETRY_WINDOW => return Ok(Err(why)),
            Err(_) => std::thread::sleep(RETRY_PAUSE),
        }
    }
}

/// Compare an answer with what the check expects; `Err` says how it differs.
pub fn judge(check: &HttpCheck, got: &Result<Response, String>) -> Result<(), (String, String)> {
    let expected = match &check.contains {
        Some(needle) => format!("status {} with a body containing {needle:?}", check.status),
        None => format!("status {}", check.status),
    };
    match got {
        Err(why) => Err((
            expected,
            format!(
                "no answer: {why} (is the service listening on that port, and does the image bring up \
                 its network, e.g. DHCP with systemd-networkd?)"
            ),
        )),
        Ok(resp) if resp.status != check.status => {
            Err((expected, format!("status {}, body {:?}", resp.status, excerpt(&resp.body))))
        }
        Ok(resp) => match &check.contains {
            Some(needle) if !resp.body.contains(needle.as_str()) => {
                Err((expected, format!("status {}, body {:?}", resp.status, excerpt(&resp.body))))
            }
            _ => Ok(()),
        },
    }
}

fn excerpt(s: &str) -> String {
    let mut end = s.len().min(BODY_EXCERPT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("{}…", &s[..end])
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: u16, contains: Option<&str>) -> HttpCheck {
        HttpCheck {
            port: 80,
            path: "/".into(),
            status,
            contains: contains.map(str::to_owned),
        }
    }

    #[test]
    fn responses_parse() {
        let ok =
            parse_response(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\n<h1>hello</h1>\n").unwrap();
        assert_eq!(
            ok,
            Response {
                status: 200,
                body: "<h1>hello</h1>\n".into()
            }
        );
        let bare = parse_response(b"HTTP/1.0 404 Not Found\n\nnope").unwrap();
        assert_eq!(
            bare,
            Response {
                status: 404,
                body: "nope".into()
            }
        );
        let head_only = parse_response(b"HTTP/1.1 204 No Content\r\n").unwrap();
        assert_eq!(head_only.status, 204);
        assert!(parse_response(b"").unwrap_err().contains("empty"));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n")
            .unwrap_err()
            .contains("not an HTTP"));
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn judging_names_expected_and_got() {
        let hello = Ok(Response {
            status: 200,
            body: "say hello".into(),
        });
        assert!(judge(&check(200, Some("hello")), &hello).is_ok());
        assert!(judge(&check(200, None), &hello).is_ok());
        let (want, got) = judge(&check(200, Some("bye")), &hello).unwrap_err();
        assert_eq!(want, "status 200 with a body containing \"bye\"");
        assert_eq!(got, "status 200, body \"say hello\"");
        let (want, got) = judge(&check(404, None), &hello).unwrap_err();
        assert_eq!(want, "status 404");
        assert!(got.starts_with("status 200"));
        let (_, got) =
            judge(&check(200, None), &Err("connection failed: refused".into())).unwrap_err();
        assert!(
            got.starts_with("no answer: connection failed: refused ("),
            "{got}"
        );
    }

    #[test]
    fn get_talks_http_to_a_local_server() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello from test")
                .unwrap();
            req
        });
        let resp = get(port, "/index.html").unwrap().unwrap();
        assert_eq!(
            resp,
            Response {
                status: 200,
                body: "hello from test".into()
            }
        );
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /index.html HTTP/1.0\r\n"));
    }

    #[test]
    fn excerpt_cuts_on_a_char_boundary() {
        let long = "é".repeat(300);
        let e = excerpt(&long);
        assert!(e.ends_with('…'));
        assert!(e.len() <= BODY_EXCERPT + '…'.len_utf8());
    }
}
