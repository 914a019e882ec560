//! `out/NAME.spdx.json`: an SPDX 2.3 SBOM of the image's Debian packages.
//!
//! The document describes one package for the image (its file name and
//! sha256) that CONTAINS one package per installed Debian package, each
//! with a purl (`pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=debian-13`,
//! the form Debian tooling, syft and trivy use) and its source package.
//! Licenses are NOASSERTION: dpkg does not record them in a machine-readable
//! form kiln could trust.

use serde_json::{json, Value};

use super::manifest::Manifest;
use crate::store::Package;

/// Percent-encode everything but the characters purl leaves as they are.
fn purl_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn purl(p: &Package, distro: &str) -> String {
    format!(
        "pkg:deb/debian/{}@{}?arch={}&distro={}",
        purl_encode(&p.name),
        purl_encode(&p.version),
        purl_encode(&p.arch),
        purl_encode(distro)
    )
}

/// SPDX ids allow letters, digits, `.` and `-`; the index keeps them unique.
fn spdx_id(i: usize, p: &Package) -> String {
    let clean: String = p
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("SPDXRef-Package-{i}-{clean}-{}", p.arch)
}

pub fn spdx(m: &Manifest) -> Value {
    let distro = suite_distro(m);
    let image_id = "SPDXRef-Image";
    let mut packages = vec![json!({
        "SPDXID": image_id,
        "name": m.image.file,
        "versionInfo": m.image.key.short(),
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "checksums": [{ "algorithm": "SHA256", "checksumValue": m.image.sha256 }],
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "supplier": "NOASSERTION",
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "comment": format!("VM image built by kiln {} from {}", m.kiln_version, m.recipe.first().map_or("", |r| r.path.as_str())),
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    for (i, p) in m.packages.iter().enumerate() {
        let id = spdx_id(i, p);
        let mut pkg = json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "supplier": "NOASSERTION",
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "LIBRARY",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(p, &distro),
            }],
        });
        if !p.source.is_empty() && p.source != p.name {
            pkg["sourceInfo"] = json!(format!("built package from: {}", p.source));
        }
        packages.push(pkg);
        relationships.push(json!({ "spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": id }));
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{}-{}", m.name, m.image.key.short()),
        "documentNamespace": format!("https://kiln.invalid/spdx/{}/{}", m.name, m.image.sha256),
        "creationInfo": {
            "created": m.built.finished,
            "creators": [format!("Tool: kiln-{}", m.kiln_version)],
        },
        "packages": packages,
        "relationships": relationships,
    })
}

/// The distro qualifier (`debian-13`): base-files' version starts with the
/// Debian release it belongs to.
fn suite_distro(m: &Manifest) -> String {
    m.packages
        .iter()
        .find(|p| p.name == "base-files")
        .and_then(|p| p.version.split(['.', '+', '~']).next())
        .filter(|major| major.chars().all(|c| c.is_ascii_digit()) && !major.is_empty())
        .map_or_else(|| "debian".to_owned(), |major| format!("debian-{major}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purls_encode_epochs_and_plus() {
        let p = Package {
            name: "libstdc++6".into(),
            version: "1:14.2.0-19".into(),
            arch: "amd64".into(),
            source: "gcc-14".into(),
        };
        assert_eq!(
            purl(&p, "debian-13"),
            "pkg:deb/debian/libstdc%2B%2B6@1%3A14.2.0-19?arch=amd64&distro=debian-13"
        );
        assert_eq!(spdx_id(3, &p), "SPDXRef-Package-3-libstdc--6-amd64");
    }
}
