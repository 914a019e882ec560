//! `kiln diff A B`: what changed between two built images, from their
//! manifests: packages (added, removed, changed with both versions), files
//! (added, removed, changed, with sizes) and which layer keys differ.

use std::collections::BTreeMap;

use serde::Serialize;

use super::manifest::Manifest;
use super::tree::{self, FileEntry};
use crate::packages::{self, PackageChange};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    /// `added`, `removed`, or what differs (`content`, `mode 0644 -> 0600`…).
    pub change: String,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerChange {
    pub step: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImageDiff {
    pub packages: Vec<PackageChange>,
    pub files: Vec<FileChange>,
    pub layers: Vec<LayerChange>,
    /// False when either manifest lacks its file list.
    pub files_compared: bool,
}

impl ImageDiff {
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty() && self.files.is_empty() && self.layers.is_empty()
    }
}

pub fn diff(a: &Manifest, b: &Manifest) -> ImageDiff {
    let pkgs = |m: &Manifest| {
        packages::versions(
            m.packages
                .iter()
                .map(|p| (p.name.as_str(), p.arch.as_str(), p.version.as_str())),
        )
    };
    let packages = packages::diff(&pkgs(a), &pkgs(b));

    let mut files = Vec::new();
    let files_compared = a.files.is_some() && b.files.is_some();
    if let (Some(fa), Some(fb)) = (&a.files, &b.files) {
        let size =
            |list: &[FileEntry], path: &str| list.iter().find(|e| e.path == path).map(|e| e.size);
        let d = tree::compare(fa, fb, &|_| false, false);
        for m in d.modified {
            files.push(FileChange {
                old_size: size(fa, &m.path),
                new_size: size(fb, &m.path),
                change: m.changes.join(", "),
                path: m.path,
            });
        }
        for p in d.added {
            files.push(FileChange {
                new_size: size(fb, &p),
                old_size: None,
                change: "added".into(),
                path: p,
            });
        }
        for p in d.removed {
            files.push(FileChange {
                old_size: size(fa, &p),
                new_size: None,
                change: "removed".into(),
                path: p,
            });
        }
        files.sort_by(|x, y| x.path.cmp(&y.path));
    }

    let keys = |m: &Manifest| -> BTreeMap<String, String> {
        m.steps
            .iter()
            .map(|s| (s.id.clone(), s.key.hex()))
            .collect()
    };
    let (ka, kb) = (keys(a), keys(b));
    let mut layers: Vec<LayerChange> = Vec::new();
    for step in a
        .steps
        .iter()
        .map(|s| &s.id)
        .chain(b.steps.iter().map(|s| &s.id))
    {
        if layers.iter().any(|l| &l.step == step) {
            continue;
        }
        let (o, n) = (ka.get(step).cloned(), kb.get(step).cloned());
        if o != n {
            layers.push(LayerChange {
                step: step.clone(),
                old: o,
                new: n,
            });
        }
    }
    ImageDiff {
        packages,
        files,
        layers,
        files_compared,
    }
}

/// The readable report.
pub fn text(d: &ImageDiff) -> String {
    let mut s = String::new();
    let none = || "-".to_owned();
    let short = |k: &Option<String>| {
        k.as_ref()
            .map_or_else(none, |k| k[..12.min(k.len())].to_owned())
    };
    if d.is_empty() {
        s.push_str("the images are the same (packages, files and layer keys)\n");
        return s;
    }
    if !d.layers.is_empty() {
        s.push_str("layers whose key differs:\n");
        let rows: Vec<Vec<String>> = d
            .layers
            .iter()
            .map(|l| vec![l.step.clone(), short(&l.old), short(&l.new)])
            .collect();
        s.push_str(&indent(&crate::ui::table(
            &["STEP", "OLD KEY", "NEW KEY"],
            &rows,
        )));
    }
    if !d.packages.is_empty() {
        s.push_str(&format!("packages ({} changed):\n", d.packages.len()));
        let rows: Vec<Vec<String>> = d
            .packages
            .iter()
            .map(|p| {
                let what = match (&p.old, &p.new) {
                    (None, Some(_)) => "added",
                    (Some(_), None) => "removed",
                    _ => "changed",
                };
                vec![
                    p.name.clone(),
                    what.to_owned(),
                    p.old.clone().unwrap_or_else(none),
                    p.new.clone().unwrap_or_else(none),
                ]
            })
            .collect();
        s.push_str(&indent(&crate::ui::table(
            &["PACKAGE", "CHANGE", "OLD", "NEW"],
            &rows,
        )));
    }
    if !d.files_compared {
        s.push_str("files: not compared (a manifest has no file list; rebuild that image with --refresh)\n");
    } else if !d.files.is_empty() {
        s.push_str(&format!("files ({} changed):\n", d.files.len()));
        let size = |v: Option<u64>| v.map_or_else(none, |n| n.to_string());
        let rows: Vec<Vec<String>> = d
            .files
            .iter()
            .map(|f| {
                vec![
                    f.path.clone(),
                    f.change.clone(),
                    size(f.old_size),
                    size(f.new_size),
                ]
            })
            .collect();
        s.push_str(&indent(&crate::ui::table(
            &["PATH", "CHANGE", "OLD SIZE", "NEW SIZE"],
            &rows,
        )));
    }
    s
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(packages: serde_json::Value, files: serde_json::Value, base_key: &str) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "schema": "kiln-manifest-v1", "kiln_version": "0", "name": "t", "recipe": [], "lock": null,
            "source_date_epoch": 0,
            "steps": [{ "id": "base", "layer": "base", "key": base_key.repeat(64) }],
            "image": { "key": "0".repeat(64), "file": "t.qcow2", "sha256": "", "bytes": 0, "format": "qcow2", "kernel": "" },
            "packages": packages,
            "built": { "user": "u", "sudo_user": null, "host": "h", "started": "", "finished": "" },
            "git": null, "volumes": [], "files": files,
        }))
        .unwrap()
    }

    fn pkg(name: &str, version: &str) -> serde_json::Value {
        serde_json::json!({ "name": name, "version": version, "arch": "amd64", "source": name })
    }

    fn file(path: &str, size: u64, sha: &str) -> serde_json::Value {
        serde_json::json!({ "path": path, "type": "file", "mode": "0644", "uid": 0, "gid": 0, "size": size, "sha256": sha, "mtime": 0 })
    }

    #[test]
    fn lists_package_file_and_layer_changes() {
        let a = manifest(
            serde_json::json!([pkg("a", "1"), pkg("b", "1"), pkg("gone", "1")]),
            serde_json::json!([file("/etc/x", 1, "aa"), file("/etc/old", 2, "bb")]),
            "1",
        );
        let b = manifest(
            serde_json::json!([pkg("a", "1"), pkg("b", "2"), pkg("new", "1")]),
            serde_json::json!([file("/etc/x", 3, "cc"), file("/etc/new", 4, "dd")]),
            "2",
        );
        let d = diff(&a, &b);
        let p: Vec<(String, Option<String>, Option<String>)> = d
            .packages
            .iter()
            .map(|c| (c.name.clone(), c.old.clone(), c.new.clone()))
            .collect();
        assert_eq!(
            p,
            [
                ("b".into(), Some("1".into()), Some("2".into())),
                ("gone".into(), Some("1".into()), None),
                ("new".into(), None, Some("1".into()))
            ]
        );
        let f: Vec<(&str, &str, Option<u64>, Option<u64>)> = d
            .files
            .iter()
            .map(|c| (c.path.as_str(), c.change.as_str(), c.old_size, c.new_size))
            .collect();
        assert_eq!(
            f,
            [
                ("/etc/new", "added", None, Some(4)),
                ("/etc/old", "removed", Some(2), None),
                ("/etc/x", "content, size 1 -> 3", Some(1), Some(3))
            ]
        );
        assert_eq!(d.layers.len(), 1);
        assert!(
            text(&d).contains("b        changed  1    2"),
            "{}",
            text(&d)
        );
        assert!(diff(&a, &a).is_empty());
    }
}
