//! Which archive to use.
//!
//! Recipes normally leave `mirror` unset; kiln then uses the archive the
//! host's apt already uses (which also honours a company mirror), read from
//! /etc/apt/sources.list and /etc/apt/sources.list.d at run time. No archive
//! host name is written in kiln itself.

use std::path::Path;

/// The archive URIs to use for a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrors {
    /// Serves SUITE and SUITE-updates.
    pub main: String,
    /// Serves SUITE-security.
    pub security: String,
}

/// The mirrors for a recipe: its own `mirror`, or the host's.
pub fn mirrors(recipe_mirror: Option<&str>, apt_dir: &Path) -> Option<Mirrors> {
    if let Some(m) = recipe_mirror {
        let m = m.trim_end_matches('/').to_owned();
        return Some(Mirrors {
            security: format!("{m}-security"),
            main: m,
        });
    }
    let entries = host_entries(apt_dir);
    let main = entries
        .iter()
        .find(|(_, suite)| !suite.contains('-'))
        .or_else(|| entries.first())?
        .0
        .clone();
    let security = entries
        .iter()
        .find(|(_, suite)| suite.ends_with("-security") || suite.ends_with("/updates"))
        .map(|(uri, _)| uri.clone())
        .unwrap_or_else(|| format!("{main}-security"));
    Some(Mirrors { main, security })
}

/// `(uri, suite)` of every `deb` source the host's apt is configured with.
/// The files in an apt `sources.list.d`, in the order apt reads them (a
/// missing folder has none).
pub fn source_parts(apt_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(apt_dir.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

fn host_entries(apt_dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(apt_dir.join("sources.list")) {
        out.extend(parse_one_line(&text));
    }
    for file in source_parts(apt_dir) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_one_line(&text)),
            Some("sources") => out.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    out.into_iter()
        .filter(|(uri, _)| !uri.is_empty())
        .map(|(u, s)| (u.trim_end_matches('/').to_owned(), s))
        .collect()
}

fn parse_one_line(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            let rest = if rest.starts_with('[') {
                rest.split_once(']')?.1.trim_start()
            } else {
                rest
            };
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

fn parse_deb822(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = "";
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut enabled = true;
        for line in stanza.lines().filter(|l| !l.starts_with('#')) {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = v.trim(),
                "uris" => uris = v.split_whitespace().collect(),
                "suites" => suites = v.split_whitespace().collect(),
                "enabled" => enabled = v.trim() != "no",
                _ => {}
            }
        }
        if enabled && types.split_whitespace().any(|t| t == "deb") {
            for uri in &uris {
                for suite in &suites {
                    out.push((uri.to_string(), suite.to_string()));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_formats_and_finds_security() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sources.list"),
            "# comment\ndeb-src http://127.0.0.1:8001/debian x main\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://127.0.0.1:8001/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://127.0.0.1:8002/debian-security\nSuites: bookworm-security\nComponents: main\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/off.list.disabled"),
            "deb http://127.0.0.1:8003/ x main\n",
        )
        .unwrap();
        let m = mirrors(None, dir.path()).unwrap();
        assert_eq!(
            m,
            Mirrors {
                main: "http://127.0.0.1:8001/debian".into(),
                security: "http://127.0.0.1:8002/debian-security".into()
            }
        );
    }

    #[test]
    fn recipe_mirror_wins_and_one_line_options_are_skipped() {
        assert_eq!(
            parse_one_line(
                "deb [arch=amd64 signed-by=/k.gpg] http://127.0.0.1:8004/debian trixie main\n"
            ),
            vec![("http://127.0.0.1:8004/debian".into(), "trixie".into())]
        );
        let m = mirrors(
            Some("http://127.0.0.1:9/debian/"),
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(m.main, "http://127.0.0.1:9/debian");
        assert_eq!(m.security, "http://127.0.0.1:9/debian-security");
        assert_eq!(mirrors(None, Path::new("/nonexistent")), None);
    }
}
