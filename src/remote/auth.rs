//! Registry credentials, as Docker and Podman keep them, and the two
//! challenges a registry answers a `401` with.
//!
//! Where credentials are looked for, first found wins (what `podman login`
//! and `docker login` write):
//!
//! ```text
//! $REGISTRY_AUTH_FILE                        podman, skopeo, buildah
//! $XDG_RUNTIME_DIR/containers/auth.json      podman's default
//! $DOCKER_CONFIG/config.json, else ~/.docker/config.json
//! ```
//!
//! Each is `{"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}`
//! (a key may also carry a scheme or a `/v1/` path, as old docker wrote).
//! Credential helpers (`credsStore`) are not run.
//!
//! A credential never reaches a message: [`Credentials`] prints as the user
//! name and the file it came from, and errors name only those.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A user and password for one registry host.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    password: String,
    /// The file they were read from, for messages.
    pub from: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user {} (from {})", self.user, self.from.display())
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic(&self) -> String {
        format!(
            "Basic {}",
            crate::sign::b64(format!("{}:{}", self.user, self.password).as_bytes())
        )
    }
}

/// The files credentials are looked for in, in order.
fn auth_files() -> Vec<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let mut files = Vec::new();
    if let Some(file) = var("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(file));
    }
    if let Some(run) = var("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(run).join("containers/auth.json"));
    }
    match (var("DOCKER_CONFIG"), var("HOME")) {
        (Some(dir), _) => files.push(PathBuf::from(dir).join("config.json")),
        (None, Some(home)) => files.push(PathBuf::from(home).join(".docker/config.json")),
        (None, None) => {}
    }
    files
}

/// The credentials for `host` (`name[:port]`), if any file has them.
pub fn lookup(host: &str) -> Result<Option<Credentials>> {
    for file in auth_files() {
        if !file.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading registry credentials from {}", file.display()))?;
        if let Some(found) = from_config(&text, host, &file)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The entry for `host` in one config file's `auths`.
pub fn from_config(text: &str, host: &str, file: &Path) -> Result<Option<Credentials>> {
    let config: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{} is not JSON", file.display()))?;
    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let Some(entry) = auths
        .iter()
        .find(|(k, _)| normalize(k) == host)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    let bad = || {
        anyhow::anyhow!(
            "{}: auths.\"{host}\".auth is not base64 of USER:PASSWORD; run `podman login {host}` or `docker login {host}` again",
            file.display()
        )
    };
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = crate::sign::unb64(auth).ok_or_else(bad)?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, password) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            from: file.to_owned(),
        }));
    }
    match (
        entry.get("username").and_then(|u| u.as_str()),
        entry.get("password").and_then(|p| p.as_str()),
    ) {
        (Some(user), Some(password)) => Ok(Some(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            from: file.to_owned(),
        })),
        _ => Ok(None),
    }
}

/// `https://host:5000/v1/` → `host:5000`.
fn normalize(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    /// Get a token from `realm` for `service` (and a scope kiln adds).
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parse `Basic realm="…"` or `Bearer realm="…",service="…",scope="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    for (name, value) in split_params(params) {
        match name.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            _ => {}
        }
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
    })
}

/// `a="x,y",b=z` → [(a, x,y), (b, z)].
fn split_params(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let Some((name, after)) = rest.split_once('=') else {
            break;
        };
        let name = name.trim().trim_start_matches(',').trim().to_owned();
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (quoted[..end].to_owned(), &quoted[end + 1..]),
                None => (quoted.to_owned(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_owned(), &after[end..]),
                None => (after.trim().to_owned(), ""),
            }
        };
        out.push((name, value));
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_as_registries_send_them() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://127.0.0.1:5001/token",service="127.0.0.1:5000",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://127.0.0.1:5001/token".into(),
                service: Some("127.0.0.1:5000".into())
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn credentials_come_from_auths_by_host_and_never_print_the_password() {
        let file = Path::new("/run/auth.json");
        let auth = crate::sign::b64(b"ci:s3cret-pw");
        let text = format!(
            r#"{{"auths": {{"https://127.0.0.1:5000/v1/": {{"auth": "{auth}"}}, "other:1": {{"username": "u", "password": "p"}}}}}}"#
        );
        let found = from_config(&text, "127.0.0.1:5000", file)
            .unwrap()
            .expect("found by host:port");
        assert_eq!(found.user, "ci");
        assert_eq!(found.basic(), format!("Basic {auth}"));
        assert!(!format!("{found:?}").contains("s3cret"));
        assert_eq!(
            from_config(&text, "other:1", file).unwrap().unwrap().user,
            "u"
        );
        assert!(from_config(&text, "127.0.0.1:5001", file)
            .unwrap()
            .is_none());
        let bad = r#"{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}"#;
        let err = from_config(bad, "h", file).unwrap_err().to_string();
        assert!(
            err.contains("USER:PASSWORD") && err.contains("login h"),
            "{err}"
        );
    }
}
