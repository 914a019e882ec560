//! A small blocking client for the OCI distribution API: the seven
//! requests kiln's cache makes, and nothing else.
//!
//! ```text
//! GET  /v2/                              the challenge: which auth, if any
//! HEAD|GET /v2/<repo>/manifests/<tag>    is a key there; its manifest
//! PUT  /v2/<repo>/manifests/<tag>        publish a key (the last request of a push)
//! HEAD|GET /v2/<repo>/blobs/<digest>     is a blob there; stream it to a file
//! POST /v2/<repo>/blobs/uploads/         start an upload, then
//! PUT  <Location>&digest=<digest>        send the blob in one piece
//! ```
//!
//! Why not the `oci-client` crate: it is async, and brings tokio, reqwest
//! and (through reqwest's rustls) a C build of aws-lc into a program that
//! is otherwise synchronous; on a two-core builder that is minutes of
//! compile time for seven requests. `ureq` is blocking, small, and its
//! rustls uses ring.
//!
//! Blobs are streamed between a file and the socket, never held in memory
//! (Ctrl-C is looked for between reads, so it stops a long transfer), and
//! are uploaded monolithically (chunked PATCH uploads were 50–100 %
//! slower in oci-client's measurements).
//!
//! ## Bounded waits
//!
//! Every request has bounded timeouts: [`CONNECT_TIMEOUT`] to connect, and
//! [`IO_TIMEOUT`] for the answer to start and for each read or write after
//! that (`KILN_REGISTRY_TIMEOUT=SECONDS` sets both, for a slow link or an
//! impatient CI job). A refused or reset connection, or a 5xx/429 answer,
//! is tried again, [`ATTEMPTS`] tries in all with a backoff of
//! [`FIRST_BACKOFF`] doubling; a timeout is not (a registry that has been
//! silent that long is not about to answer, and trying again would triple
//! the wait). So the longest a stalled registry holds a build is one
//! timeout, and a dead one the backoff; either gives an [`Unavailable`]
//! error, which the cache turns into one warning and a local build, asking
//! that registry nothing more in the run.
//!
//! Plain HTTP only for `oci+http://` references (a loopback registry in a
//! test, say); `oci://` is HTTPS, with the web's root certificates or, with
//! `KILN_REGISTRY_CA=FILE`, the PEM certificates in FILE.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use ureq::http;

use super::auth::{self, Challenge, Credentials};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a registry may go without sending or taking a byte.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Overrides both timeouts, in seconds.
pub const TIMEOUT_ENV: &str = "KILN_REGISTRY_TIMEOUT";
/// Tries of one request when the registry is unreachable or answers 5xx/429.
pub const ATTEMPTS: u32 = 3;
/// The wait before the second try; doubled before each later one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A manifest is small JSON; anything bigger is not one of kiln's.
pub const MAX_MANIFEST: u64 = 4 << 20;
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Where a cache or an image lives: `oci://HOST[:PORT]/REPO` (HTTPS) or
/// `oci+http://HOST[:PORT]/REPO` (plain HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub plain_http: bool,
    pub host: String,
    pub repository: String,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.plain_http { "oci+http" } else { "oci" };
        write!(f, "{scheme}://{}/{}", self.host, self.repository)
    }
}

impl Reference {
    pub fn parse(text: &str) -> Result<Reference, String> {
        let (plain_http, rest) = if let Some(rest) = text.strip_prefix("oci+http://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("oci://") {
            (false, rest)
        } else {
            return Err(format!(
                "`{text}` is not a registry reference: write oci://HOST[:PORT]/REPOSITORY (HTTPS), or oci+http://HOST:PORT/REPOSITORY for a plain-HTTP registry"
            ));
        };
        let (host, repository) = rest.split_once('/').ok_or_else(|| {
            format!("`{text}` names no repository: write oci://HOST[:PORT]/REPOSITORY")
        })?;
        let repository = repository.trim_end_matches('/');
        if host.is_empty() || host.contains('@') {
            return Err(format!(
                "`{text}`: the host must be HOST[:PORT] (credentials go in the Docker/Podman auth file, never in the reference)"
            ));
        }
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(format!(
                "`{text}`: `{repository}` is not a repository name (lowercase letters, digits and . _ - between them, / between parts)"
            ));
        }
        Ok(Reference {
            plain_http,
            host: host.to_owned(),
            repository: repository.to_owned(),
        })
    }

    fn base(&self) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}", self.host)
    }
}

/// A path component of a repository name (distribution's grammar).
fn valid_component(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes
            .iter()
            .all(|b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
}

/// The registry could not be reached, or kept failing on its side (5xx):
/// not the registry's verdict on what was asked.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The registry refused this client: no credentials, or wrong ones.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Whether an error is about the registry as a whole (unreachable, failing,
/// or refusing us), not about what was asked of it.
pub fn is_unusable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unavailable>() || c.is::<Denied>())
}

/// A blob whose bytes are not the ones its descriptor names.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// A request body that can be sent again (a retry or a new challenge).
enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    File(&'a Path),
}

pub struct Client {
    agent: ureq::Agent,
    pub reference: Reference,
    credentials: Option<Credentials>,
    /// Ask for a token that may push, not only pull.
    push: bool,
    /// The `Authorization` header the last challenge called for.
    authorization: Mutex<Option<String>>,
}

impl Client {
    pub fn new(reference: Reference, push: bool) -> Result<Client> {
        let (connect, io) = timeouts()?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(!reference.plain_http)
            .timeout_connect(Some(connect))
            .timeout_per_read(Some(io))
            .timeout_per_write(Some(io))
            .timeout_recv_response(Some(io))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = std::env::var_os("KILN_REGISTRY_CA").filter(|v| !v.is_empty()) {
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&read_certs(
                        Path::new(&ca),
                    )?))
                    .build(),
            );
        }
        let credentials = auth::lookup(&reference.host)?;
        Ok(Client {
            agent: config.build().into(),
            reference,
            credentials,
            push,
            authorization: Mutex::new(None),
        })
    }

    fn url(&self, rest: &str) -> String {
        format!(
            "{}/v2/{}/{rest}",
            self.reference.base(),
            self.reference.repository
        )
    }

    /// One request, with retries on unavailability and one new challenge
    /// on a 401.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<http::Response<ureq::Body>> {
        let mut challenged = false;
        let mut attempt = 1;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let mut request = http::Request::builder().method(method).uri(url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let authorization = self
                .authorization
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            let what = format!("{method} {url}");
            let result = match body {
                Body::Empty => self.agent.run(request.body(()).context("a bad request")?),
                Body::Bytes(bytes) => self
                    .agent
                    .run(request.body(bytes).context("a bad request")?),
                Body::File(path) => {
                    let file =
                        File::open(path).with_context(|| format!("opening {}", path.display()))?;
                    let size = file
                        .metadata()
                        .with_context(|| format!("reading {}", path.display()))?
                        .len();
                    let body = ureq::SendBody::from_owned_reader(Interruptible(file));
                    self.agent.run(
                        request
                            .header("Content-Length", size)
                            .body(body)
                            .context("a bad request")?,
                    )
                }
            };
            crate::cmd::check_interrupt()?;
            let failure = match result {
                Ok(response) if response.status() == 401 && !challenged => {
                    challenged = true;
                    let header = response
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    self.authenticate(&header)?;
                    continue;
                }
                Ok(response) if response.status() == 401 => {
                    return Err(Denied(self.refused_credentials()).into())
                }
                Ok(response) if response.status().is_server_error() || response.status() == 429 => {
                    format!("{what}: the registry answered {}", response.status())
                }
                Ok(response) => return Ok(response),
                Err(ureq::Error::Timeout(t)) => {
                    return Err(Unavailable(format!(
                        "{what}: no answer within the timeout ({t}; {TIMEOUT_ENV} sets it)"
                    ))
                    .into())
                }
                Err(e) if transient(&e) => format!("{what}: {e}"),
                Err(e) => return Err(anyhow::Error::new(e).context(what)),
            };
            if attempt >= ATTEMPTS {
                return Err(Unavailable(format!("{failure} (after {attempt} tries)")).into());
            }
            crate::cmd::log_line(&format!("registry: {failure}; trying again in {backoff:?}"));
            std::thread::sleep(backoff);
            attempt += 1;
            backoff *= 2;
        }
    }

    /// Answer a `WWW-Authenticate` challenge: Basic with the configured
    /// credentials, or a Bearer token from the realm it names.
    fn authenticate(&self, header: &str) -> Result<()> {
        let host = &self.reference.host;
        let value = match auth::parse_challenge(header) {
            Some(Challenge::Basic) => self
                .credentials
                .as_ref()
                .ok_or_else(|| Denied(self.no_credentials()))?
                .basic(),
            Some(Challenge::Bearer { realm, service }) => self.token(&realm, service.as_deref())?,
            None => anyhow::bail!(
                "{host} asks for an authentication kiln does not speak (`{}`)",
                header.split(' ').next().unwrap_or("")
            ),
        };
        *self.authorization.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        Ok(())
    }

    /// A token for this repository from a Bearer realm.
    fn token(&self, realm: &str, service: Option<&str>) -> Result<String> {
        let actions = if self.push { "pull,push" } else { "pull" };
        let scope = format!("repository:{}:{actions}", self.reference.repository);
        let mut url = format!("{realm}?scope={}", query_escape(&scope));
        if let Some(service) = service {
            url += &format!("&service={}", query_escape(service));
        }
        let mut request = http::Request::builder().method("GET").uri(&url);
        if let Some(c) = &self.credentials {
            request = request.header("Authorization", c.basic());
        }
        let response = self
            .agent
            .run(request.body(()).context("a bad token request")?)
            .map_err(|e| Unavailable(format!("asking {realm} for a token: {e}")))?;
        if response.status() == 401 || response.status() == 403 {
            return Err(Denied(self.refused_credentials()).into());
        }
        if !response.status().is_success() {
            anyhow::bail!(
                "{realm} answered {} to a token request for {scope}",
                response.status()
            );
        }
        let body = read_small(response, MAX_MANIFEST)?;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("{realm}: a token that is not JSON"))?;
        let token = json
            .get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .with_context(|| format!("{realm}: a token answer without a token"))?;
        Ok(format!("Bearer {token}"))
    }

    fn no_credentials(&self) -> String {
        let host = &self.reference.host;
        format!(
            "{host} needs credentials and none are configured for it: run `podman login {host}` or `docker login {host}`, or set REGISTRY_AUTH_FILE to an auth.json that has them"
        )
    }

    fn refused_credentials(&self) -> String {
        let host = &self.reference.host;
        match &self.credentials {
            Some(c) => format!(
                "{host} refused the credentials of user {} (from {}): log in again, or check that the user may {} {}",
                c.user,
                c.from.display(),
                if self.push { "push to" } else { "pull from" },
                self.reference.repository
            ),
            None => self.no_credentials(),
        }
    }

    /// The manifest tagged `tag`, or `None` when there is no such tag.
    pub fn manifest(&self, tag: &str) -> Result<Option<Vec<u8>>> {
        let url = self.url(&format!("manifests/{tag}"));
        let response = self.send("GET", &url, &[("Accept", MANIFEST_TYPE)], Body::Empty)?;
        match response.status().as_u16() {
            200 => Ok(Some(read_small(response, MAX_MANIFEST)?)),
            404 => Ok(None),
            _ => Err(refused("GET", &url, response)),
        }
    }

    pub fn has_manifest(&self, tag: &str) -> Result<bool> {
        let url = self.url(&format!("manifests/{tag}"));
        self.exists(&url, &[("Accept", MANIFEST_TYPE)])
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool> {
        self.exists(&self.url(&format!("blobs/{digest}")), &[])
    }

    fn exists(&self, url: &str, headers: &[(&str, &str)]) -> Result<bool> {
        let response = self.send("HEAD", url, headers, Body::Empty)?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(refused("HEAD", url, response)),
        }
    }

    /// Publish a manifest under `tag` (what makes a push visible).
    pub fn put_manifest(&self, tag: &str, manifest: &[u8]) -> Result<()> {
        let url = self.url(&format!("manifests/{tag}"));
        let response = self.send(
            "PUT",
            &url,
            &[("Content-Type", MANIFEST_TYPE)],
            Body::Bytes(manifest),
        )?;
        match response.status().as_u16() {
            200 | 201 => Ok(()),
            _ => Err(refused("PUT", &url, response)),
        }
    }

    /// Stream the blob `digest` into `dest`, refusing it unless it is
    /// exactly `size` bytes with that sha256.
    pub fn get_blob(&self, digest: &str, size: u64, dest: &Path) -> Result<()> {
        let url = self.url(&format!("blobs/{digest}"));
        let response = self.send("GET", &url, &[], Body::Empty)?;
        if response.status() != 200 {
            return Err(refused("GET", &url, response));
        }
        let mut reader = response.into_body().into_reader().take(size + 1);
        let mut file =
            File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            crate::cmd::check_interrupt()?;
            let n = reader
                .read(&mut buf)
                .map_err(|e| Unavailable(format!("reading {url}: {e}")))?;
            if n == 0 {
                break;
            }
            got += n as u64;
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        if got != size {
            return Err(Mismatch(format!(
                "the blob {digest} is {got} bytes where its manifest says {size}"
            ))
            .into());
        }
        let actual = format!("sha256:{}", crate::plan::key::hex(&hasher.finalize()));
        if actual != digest {
            return Err(Mismatch(format!(
                "the blob served as {digest} has the digest {actual}"
            ))
            .into());
        }
        file.sync_all()
            .with_context(|| format!("syncing {}", dest.display()))
    }

    /// Upload a blob from a file, unless the registry has it.
    pub fn put_blob(&self, digest: &str, path: &Path) -> Result<()> {
        self.upload(digest, Body::File(path))
    }

    pub fn put_blob_bytes(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.upload(digest, Body::Bytes(bytes))
    }

    fn upload(&self, digest: &str, body: Body) -> Result<()> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        let url = self.url("blobs/uploads/");
        let response = self.send("POST", &url, &[("Content-Length", "0")], Body::Empty)?;
        if response.status() != 202 {
            return Err(refused("POST", &url, response));
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("POST {url}: the registry named no upload location"))?;
        let mut put = if location.starts_with('/') {
            format!("{}{location}", self.reference.base())
        } else {
            location.to_owned()
        };
        put.push(if put.contains('?') { '&' } else { '?' });
        put += &format!("digest={}", query_escape(digest));
        let response = self.send(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream")],
            body,
        )?;
        match response.status().as_u16() {
            201 | 204 => Ok(()),
            _ => Err(refused("PUT", &url, response)),
        }
    }
}

/// A file being uploaded that stops at Ctrl-C: kiln's handler only sets
/// a flag, and a blob can take minutes to send.
struct Interruptible(File);

impl Read for Interruptible {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if crate::cmd::interrupted() {
            return Err(std::io::Error::other("interrupted"));
        }
        self.0.read(buf)
    }
}

/// The connect and I/O timeouts: the defaults, or both from
/// `KILN_REGISTRY_TIMEOUT` (the connect timeout never longer than the
/// default).
fn timeouts() -> Result<(Duration, Duration)> {
    timeouts_from(std::env::var(TIMEOUT_ENV).ok().as_deref())
}

fn timeouts_from(setting: Option<&str>) -> Result<(Duration, Duration)> {
    let Some(text) = setting.filter(|v| !v.is_empty()) else {
        return Ok((CONNECT_TIMEOUT, IO_TIMEOUT));
    };
    let io = text
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            crate::error::BadInput::arg(
                format!("{TIMEOUT_ENV}={text} is not a number of seconds"),
                format!("set {TIMEOUT_ENV} to seconds above 0, e.g. {TIMEOUT_ENV}=120"),
            )
        })?;
    Ok((io.min(CONNECT_TIMEOUT), io))
}

/// Errors a transport can recover from by trying again (a timeout is not
/// one of them, see the module doc).
fn transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)
    )
}

/// A registry's answer that is its verdict (4xx): the status and the first
/// line of its error body, which names the problem (MANIFEST_INVALID …).
fn refused(method: &str, url: &str, response: http::Response<ureq::Body>) -> anyhow::Error {
    let status = response.status();
    let body = read_small(response, 4096).unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let detail = text.lines().next().unwrap_or("").trim();
    anyhow::anyhow!("{method} {url}: the registry answered {status} {detail}")
}

fn read_small(response: http::Response<ureq::Body>, limit: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| Unavailable(format!("reading a registry answer: {e}")))?;
    Ok(out)
}

fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("reading KILN_REGISTRY_CA {}", path.display()))?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()
        .with_context(|| format!("KILN_REGISTRY_CA {} is not PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "KILN_REGISTRY_CA {} holds no certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_oci_urls_and_plain_http_is_said_out_loud() {
        let r = Reference::parse("oci+http://127.0.0.1:5000/team/kiln").unwrap();
        assert_eq!(
            r,
            Reference {
                plain_http: true,
                host: "127.0.0.1:5000".into(),
                repository: "team/kiln".into()
            }
        );
        assert_eq!(r.to_string(), "oci+http://127.0.0.1:5000/team/kiln");
        assert_eq!(r.base(), "http://127.0.0.1:5000");
        let r = Reference::parse("oci://127.0.0.1:5443/kiln/").unwrap();
        assert!(!r.plain_http);
        assert_eq!(r.base(), "https://127.0.0.1:5443");
        for (bad, says) in [
            ("http://h/r", "oci+http://"),
            ("oci://h", "names no repository"),
            ("oci://user:pw@h/r", "auth file"),
            ("oci://h/Team", "not a repository name"),
            ("oci://h/a//b", "not a repository name"),
        ] {
            let err = Reference::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn kiln_registry_timeout_sets_both_timeouts_within_bounds() {
        let secs = Duration::from_secs;
        assert_eq!(timeouts_from(None).unwrap(), (CONNECT_TIMEOUT, IO_TIMEOUT));
        assert_eq!(
            timeouts_from(Some("")).unwrap(),
            (CONNECT_TIMEOUT, IO_TIMEOUT)
        );
        assert_eq!(timeouts_from(Some("3")).unwrap(), (secs(3), secs(3)));
        assert_eq!(
            timeouts_from(Some("300")).unwrap(),
            (CONNECT_TIMEOUT, secs(300))
        );
        for bad in ["0", "-1", "soon", "inf", "NaN", "1e9"] {
            let err = timeouts_from(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("KILN_REGISTRY_TIMEOUT"), "{bad}: {err}");
        }
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_escape("sha256:ab"), "sha256%3Aab");
        assert_eq!(
            query_escape("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
