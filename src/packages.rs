//! Package sets and what changed between two of them: the one diff behind
//! a step's `changes` (entry.json), `kiln diff`, the build history and the
//! `package old -> new` lines of `kiln lock --update`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A package that was installed, upgraded or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    pub name: String,
    pub arch: String,
    /// `None` when it was installed.
    pub old: Option<String>,
    /// `None` when it was removed.
    pub new: Option<String>,
}

impl fmt::Display for PackageChange {
    /// `name old -> new`, with `(none)` for a side without it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".to_owned());
        write!(f, "{} {} -> {}", self.name, v(&self.old), v(&self.new))
    }
}

/// Version per (name, architecture).
pub type Versions = BTreeMap<(String, String), String>;

/// Build a [`Versions`] from anything that names packages.
pub fn versions<'a>(packages: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> Versions {
    packages
        .into_iter()
        .map(|(name, arch, version)| ((name.to_owned(), arch.to_owned()), version.to_owned()))
        .collect()
}

/// What changed from `before` to `after`, sorted by name then architecture.
pub fn diff(before: &Versions, after: &Versions) -> Vec<PackageChange> {
    let mut changes: Vec<PackageChange> =
        after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|((name, arch), v)| PackageChange {
                name: name.clone(),
                arch: arch.clone(),
                old: before.get(&(name.clone(), arch.clone())).cloned(),
                new: Some(v.clone()),
            })
            .chain(before.iter().filter(|(k, _)| !after.contains_key(*k)).map(
                |((name, arch), o)| PackageChange {
                    name: name.clone(),
                    arch: arch.clone(),
                    old: Some(o.clone()),
                    new: None,
                },
            ))
            .collect();
    changes.sort_by(|x, y| (&x.name, &x.arch).cmp(&(&y.name, &y.arch)));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[(&str, &str)]) -> Versions {
        versions(items.iter().map(|(n, v)| (*n, "amd64", *v)))
    }

    #[test]
    fn lists_installs_upgrades_and_removals_by_name() {
        let before = set(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let after = set(&[("b", "2"), ("c", "1"), ("d", "1")]);
        let lines: Vec<String> = diff(&before, &after)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(lines, ["a 1 -> (none)", "b 1 -> 2", "d (none) -> 1"]);
    }

    #[test]
    fn same_name_other_architecture_is_another_package() {
        let before = set(&[("a", "1")]);
        let mut after = before.clone();
        after.insert(("a".into(), "i386".into()), "1".into());
        let changes = diff(&before, &after);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].arch, "i386");
    }
}
