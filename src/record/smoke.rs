//! `out/NAME.smoke.json`: the verdict of a smoke boot, tied to the disk.
//!
//! The manifest, SBOM and provenance are written before the smoke boot, so
//! none of them can say whether the image passed. This record does: an
//! in-toto Statement v1 whose predicate is the test-result predicate
//! (<https://in-toto.io/attestation/test-result/v0.1>), with
//!
//! - `subject`: the disk that was booted, its file name and sha256, so the
//!   verdict cannot be carried over to another disk;
//! - `result` `PASSED` or `FAILED`, and `passedTests` / `failedTests`
//!   naming `boot` and each check (`check 2: systemctl is-active nginx`,
//!   `http 1: GET :80/`);
//! - `configuration`: the firmware (its path and sha256), with Secure
//!   Boot on the certificate enrolled in its db (`secure-boot-db`, its
//!   SHA-256 fingerprint), and, for an upgrade test, the old disk the
//!   volumes were seeded on;
//! - `kilnSmoke`, an extension field (the in-toto parsing rules let
//!   producers add them, and consumers ignore what they do not know): each
//!   check with its exit code and output tail, the accelerator, boot-to-ready
//!   seconds, kiln's version and when the verdict was reached. The
//!   test-result predicate has no place for these; a kiln-specific predicate
//!   would have hidden the verdict from tools that know the standard one.
//!
//! `kiln build` writes it after its smoke (a cached pass writes the record
//! of that pass again), and `kiln smoke IMAGE` beside IMAGE. A copy is
//! kept in the store as `state-v1/smoke-records/<name>/<disk sha256>.json`
//! (the latest verdict on that disk for that image name), which is how
//! `kiln log` shows each build's verdict. The statement is unsigned,
//! like the provenance. `kiln smoke` keeps its record in the store only
//! when it ran the recipe's own checks on its own volumes (no `--check`,
//! `--http`, `--timeout`, `--no-volumes` or `--upgrade-from`): another test
//! is not the image's verdict.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::smoke::{CheckKind, SmokeReport};

pub const STATEMENT_TYPE: &str = super::provenance::STATEMENT_TYPE;
pub const PREDICATE_TYPE: &str = "https://in-toto.io/attestation/test-result/v0.1";
const PASSED: &str = "PASSED";
const FAILED: &str = "FAILED";
/// The test that stands for the boot itself (finished, no failed units).
const BOOT_TEST: &str = "boot";
/// Where the store keeps a copy of each disk's latest record.
const STORE_DIR: &str = "smoke-records";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: TestResult,
}

/// An artifact: a file name and its digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: DigestSet,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DigestSet {
    pub sha256: String,
}

/// The test-result predicate, plus kiln's extension field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    pub result: String,
    pub configuration: Vec<Descriptor>,
    pub passed_tests: Vec<String>,
    pub warned_tests: Vec<String>,
    pub failed_tests: Vec<String>,
    pub kiln_smoke: KilnSmoke,
}

/// An in-toto ResourceDescriptor (the fields kiln uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<DigestSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Value>,
}

/// What the test-result predicate has no field for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KilnSmoke {
    pub kiln_version: String,
    /// RFC 3339, when the verdict was reached.
    pub finished_on: String,
    pub accel: String,
    /// `None` when the boot never finished.
    pub boot_to_ready_seconds: Option<f64>,
    pub total_seconds: f64,
    pub system_state: String,
    /// Why it failed, in plain words (`None` for a pass).
    pub failure: Option<String>,
    pub checks: Vec<RecordedCheck>,
    pub checks_passed: usize,
    pub checks_total: usize,
    /// Whether the firmware enforced Secure Boot (the enrolled
    /// certificate is in `configuration` as `secure-boot-db`).
    #[serde(default)]
    pub secure_boot: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedCheck {
    /// `check 2`, `http 1`.
    pub name: String,
    pub kind: CheckKind,
    /// The command, or the HTTP request.
    pub check: String,
    pub result: String,
    pub exit_code: Option<i32>,
    pub output: Vec<String>,
}

/// The disk a record is about.
pub struct Disk<'a> {
    pub path: &'a Path,
    pub sha256: &'a str,
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The record of one smoke boot of `disk`; `upgrade_from` is the old disk
/// of an upgrade test.
pub fn statement(disk: &Disk, report: &SmokeReport, upgrade_from: Option<&Disk>) -> Statement {
    let boot_ok = !matches!(
        report.failure,
        Some(ref f) if !matches!(f, crate::smoke::SmokeFailure::ChecksFailed { .. })
    );
    let mut passed_tests = Vec::new();
    let mut failed_tests = Vec::new();
    if boot_ok {
        passed_tests.push(BOOT_TEST.to_owned());
    } else {
        failed_tests.push(BOOT_TEST.to_owned());
    }
    for c in &report.checks {
        let name = format!("{}: {}", c.name(), c.check);
        if c.passed {
            passed_tests.push(name);
        } else {
            failed_tests.push(name);
        }
    }
    let mut configuration = vec![Descriptor {
        name: "firmware".to_owned(),
        uri: Some(format!("file://{}", report.firmware.path.display())),
        digest: Some(DigestSet {
            sha256: report.firmware.sha256.clone(),
        }),
        annotations: Some(serde_json::json!({ "origin": report.firmware.origin })),
    }];
    if let Some(sb) = &report.secure_boot {
        configuration.push(Descriptor {
            name: "secure-boot-db".to_owned(),
            uri: None,
            digest: Some(DigestSet {
                sha256: sb.certificate_sha256.clone(),
            }),
            annotations: Some(serde_json::json!({
                "origin": sb.certificate_origin,
                "varsTemplate": sb.vars_template,
            })),
        });
    }
    if let Some(old) = upgrade_from {
        configuration.push(Descriptor {
            name: format!("upgrade-from:{}", file_name(old.path)),
            uri: None,
            digest: Some(DigestSet {
                sha256: old.sha256.to_owned(),
            }),
            annotations: None,
        });
    }
    let word = |ok: bool| if ok { PASSED } else { FAILED }.to_owned();
    Statement {
        type_: STATEMENT_TYPE.to_owned(),
        subject: vec![Subject {
            name: file_name(disk.path),
            digest: DigestSet {
                sha256: disk.sha256.to_owned(),
            },
        }],
        predicate_type: PREDICATE_TYPE.to_owned(),
        predicate: TestResult {
            result: word(report.passed),
            configuration,
            passed_tests,
            warned_tests: Vec::new(),
            failed_tests,
            kiln_smoke: KilnSmoke {
                kiln_version: env!("CARGO_PKG_VERSION").to_owned(),
                finished_on: super::rfc3339(report.finished),
                accel: report.accel.clone(),
                boot_to_ready_seconds: report.boot_secs,
                total_seconds: report.total_secs,
                system_state: report.system_state.clone(),
                failure: report.failure.as_ref().map(ToString::to_string),
                checks: report
                    .checks
                    .iter()
                    .map(|c| RecordedCheck {
                        name: c.name(),
                        kind: c.kind,
                        check: c.check.clone(),
                        result: word(c.passed),
                        exit_code: c.exit_code,
                        output: c.output.clone(),
                    })
                    .collect(),
                checks_passed: report.checks_passed,
                checks_total: report.checks_total,
                secure_boot: report.secure_boot.is_some(),
            },
        },
    }
}

/// `out/NAME.smoke.json` for `out/NAME.qcow2` (or for its manifest).
pub fn path_for(image: &Path) -> PathBuf {
    let name = file_name(image);
    let stem = name
        .strip_suffix(".manifest.json")
        .or_else(|| name.rsplit_once('.').map(|(s, _)| s))
        .unwrap_or(&name);
    image.with_file_name(format!("{stem}.smoke.json"))
}

/// Per image name: recipes that differ only in their checks (or in their
/// name) make the same disk, and each has its own verdict.
fn store_path(store_root: &Path, name: &str, sha256: &str) -> PathBuf {
    store_root
        .join("state-v1")
        .join(STORE_DIR)
        .join(name)
        .join(format!("{sha256}.json"))
}

/// Write the record to `path`, readable by everyone like the other records.
pub fn write(path: &Path, statement: &Statement) -> Result<()> {
    crate::files::publish_json(path, statement)
}

/// Keep the record in the store at `store_root` as the latest verdict on
/// its disk for the image `name`, which `kiln log` shows.
pub fn keep_in_store(store_root: &Path, name: &str, statement: &Statement) -> Result<()> {
    let sha256 = &statement.subject[0].digest.sha256;
    crate::store::write_json_atomic(&store_path(store_root, name, sha256), statement)
}

/// What a record says about a disk, as `kiln inspect` and `kiln log` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Verdict {
    /// No record (never smoked, or built with --no-smoke).
    None,
    /// A record for this very disk.
    Recorded(Summary),
    /// A record for another disk: it says nothing about this one.
    NotApplying {
        record: PathBuf,
        record_sha256: String,
        disk_sha256: String,
    },
    Unreadable {
        record: PathBuf,
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub passed: bool,
    pub finished: String,
    pub checks_passed: usize,
    pub checks_total: usize,
    pub failed: Vec<String>,
    pub accel: String,
    pub boot_secs: Option<f64>,
}

/// The verdict `record` holds for the disk whose sha256 is `disk_sha256`.
pub fn verdict(record: &Path, disk_sha256: &str) -> Verdict {
    if !record.exists() {
        return Verdict::None;
    }
    let s: Statement = match crate::store::read_json(record) {
        Ok(s) => s,
        Err(e) => {
            return Verdict::Unreadable {
                record: record.to_owned(),
                error: format!("{e:#}"),
            }
        }
    };
    if s.predicate_type != PREDICATE_TYPE {
        return Verdict::Unreadable {
            record: record.to_owned(),
            error: format!(
                "its predicateType is {}, not {PREDICATE_TYPE}",
                s.predicate_type
            ),
        };
    }
    let record_sha256 = s
        .subject
        .first()
        .map(|d| d.digest.sha256.clone())
        .unwrap_or_default();
    if record_sha256 != disk_sha256 {
        return Verdict::NotApplying {
            record: record.to_owned(),
            record_sha256,
            disk_sha256: disk_sha256.to_owned(),
        };
    }
    let p = &s.predicate;
    let k = &p.kiln_smoke;
    Verdict::Recorded(Summary {
        passed: p.result == PASSED && p.failed_tests.is_empty(),
        finished: k.finished_on.clone(),
        checks_passed: k.checks_passed,
        checks_total: k.checks_total,
        failed: p.failed_tests.clone(),
        accel: k.accel.clone(),
        boot_secs: k.boot_to_ready_seconds,
    })
}

/// The latest verdict the store holds on a disk (by its sha256) for the
/// image `name`.
pub fn verdict_in_store(store_root: &Path, name: &str, disk_sha256: &str) -> Verdict {
    verdict(&store_path(store_root, name, disk_sha256), disk_sha256)
}

impl Verdict {
    /// One line for `kiln inspect`.
    pub fn text(&self) -> String {
        match self {
            Verdict::None => "not smoked (no smoke record)".to_owned(),
            Verdict::Recorded(s) => {
                let mut line = format!(
                    "{} {}, {}/{} checks, {}",
                    if s.passed { "passed" } else { "FAILED" },
                    s.finished,
                    s.checks_passed,
                    s.checks_total,
                    s.accel
                );
                if let Some(b) = s.boot_secs {
                    line.push_str(&format!(", ready in {b:.1}s"));
                }
                if !s.failed.is_empty() {
                    line.push_str(&format!("; failed: {}", s.failed.join("; ")));
                }
                line
            }
            Verdict::NotApplying {
                record,
                record_sha256,
                disk_sha256,
            } => format!(
                "{} does not apply: it is for the disk with sha256 {}, this disk's is {}",
                record.display(),
                short(record_sha256),
                short(disk_sha256)
            ),
            Verdict::Unreadable { record, error } => {
                format!("{} is unreadable: {error}", record.display())
            }
        }
    }

    /// A few words for a `kiln log` column.
    pub fn short(&self) -> String {
        match self {
            Verdict::None => "-".to_owned(),
            Verdict::Recorded(s) => format!(
                "{} {}/{}",
                if s.passed { "passed" } else { "FAILED" },
                s.checks_passed,
                s.checks_total
            ),
            Verdict::NotApplying { .. } => "record does not apply".to_owned(),
            Verdict::Unreadable { .. } => "record unreadable".to_owned(),
        }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smoke::{CheckResult, FirmwareUsed, SmokeFailure};

    fn report(passed: bool) -> SmokeReport {
        let check = |kind, index, ok: bool| CheckResult {
            kind,
            index,
            check: "true".into(),
            passed: ok,
            exit_code: (kind == CheckKind::Guest).then_some(if ok { 0 } else { 1 }),
            output: vec![],
        };
        SmokeReport {
            passed,
            failure: (!passed).then(|| SmokeFailure::ChecksFailed {
                failed: vec!["http 1".into()],
                total: 2,
            }),
            accel: "tcg".into(),
            boot_secs: Some(41.5),
            total_secs: 50.0,
            checks: vec![
                check(CheckKind::Guest, 1, true),
                check(CheckKind::Http, 1, passed),
            ],
            checks_passed: if passed { 2 } else { 1 },
            checks_total: 2,
            system_state: "running".into(),
            systemd_version: Some(257),
            firmware: FirmwareUsed {
                path: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                sha256: "f".repeat(64),
                origin: "test".into(),
            },
            secure_boot: None,
            log: "out/web.smoke.log".into(),
            note: None,
            finished: 1_700_000_000,
            ssh_host_keys: vec![],
        }
    }

    #[test]
    fn a_statement_names_the_disk_and_each_test() {
        let disk = Disk {
            path: Path::new("out/web.qcow2"),
            sha256: &"a".repeat(64),
        };
        let s = statement(&disk, &report(false), None);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(v["predicateType"], PREDICATE_TYPE);
        assert_eq!(v["subject"][0]["name"], "web.qcow2");
        assert_eq!(v["subject"][0]["digest"]["sha256"], "a".repeat(64));
        assert_eq!(v["predicate"]["result"], "FAILED");
        assert_eq!(
            v["predicate"]["passedTests"],
            serde_json::json!(["boot", "check 1: true"])
        );
        assert_eq!(
            v["predicate"]["failedTests"],
            serde_json::json!(["http 1: true"])
        );
        assert_eq!(
            v["predicate"]["configuration"][0]["digest"]["sha256"],
            "f".repeat(64)
        );
        assert_eq!(
            v["predicate"]["kilnSmoke"]["finishedOn"],
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(v["predicate"]["kilnSmoke"]["checks"][1]["result"], "FAILED");
    }

    #[test]
    fn a_record_says_whether_secure_boot_was_on_and_with_which_certificate() {
        let disk = Disk {
            path: Path::new("out/web.qcow2"),
            sha256: &"a".repeat(64),
        };
        let v = serde_json::to_value(statement(&disk, &report(true), None)).unwrap();
        assert_eq!(v["predicate"]["kilnSmoke"]["secureBoot"], false);
        assert_eq!(v["predicate"]["configuration"].as_array().unwrap().len(), 1);
        let mut on = report(true);
        on.secure_boot = Some(crate::smoke::secure_boot::SecureBootUsed {
            certificate_sha256: "c".repeat(64),
            certificate_origin: "test".into(),
            vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        });
        let v = serde_json::to_value(statement(&disk, &on, None)).unwrap();
        assert_eq!(v["predicate"]["kilnSmoke"]["secureBoot"], true);
        let db = &v["predicate"]["configuration"][1];
        assert_eq!(db["name"], "secure-boot-db");
        assert_eq!(db["digest"]["sha256"], "c".repeat(64));
        // A record written before kiln knew Secure Boot reads as off.
        let mut old = v.clone();
        old["predicate"]["kilnSmoke"]
            .as_object_mut()
            .unwrap()
            .remove("secureBoot");
        let back: Statement = serde_json::from_value(old).unwrap();
        assert!(!back.predicate.kiln_smoke.secure_boot);
    }

    #[test]
    fn a_record_applies_only_to_its_own_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.smoke.json");
        assert_eq!(verdict(&path, "x"), Verdict::None);
        let sha = "b".repeat(64);
        let s = statement(
            &Disk {
                path: Path::new("web.qcow2"),
                sha256: &sha,
            },
            &report(true),
            None,
        );
        write(&path, &s).unwrap();
        keep_in_store(dir.path(), "web", &s).unwrap();
        match verdict(&path, &sha) {
            Verdict::Recorded(summary) => {
                assert!(summary.passed);
                assert_eq!((summary.checks_passed, summary.checks_total), (2, 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            verdict_in_store(dir.path(), "web", &sha),
            verdict(&path, &sha)
        );
        assert_eq!(verdict_in_store(dir.path(), "db", &sha), Verdict::None);
        let other = "c".repeat(64);
        assert!(matches!(
            verdict(&path, &other),
            Verdict::NotApplying { .. }
        ));
        assert!(verdict(&path, &other).text().contains("does not apply"));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(verdict(&path, &sha), Verdict::Unreadable { .. }));
    }

    #[test]
    fn record_paths_sit_beside_the_disk() {
        assert_eq!(
            path_for(Path::new("out/web.qcow2")),
            Path::new("out/web.smoke.json")
        );
        assert_eq!(
            path_for(Path::new("out/web.manifest.json")),
            Path::new("out/web.smoke.json")
        );
    }
}
