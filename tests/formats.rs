//! `[image] formats`: every deployable file, written by a real build into
//! the shared warm store, then read back with independent tools (qemu-img,
//! GNU tar, skopeo), then a no-op rebuild that converts nothing. The qcow2
//! these files are made from is the one the smoke tests boot; nothing here
//! boots.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::*;
use serde::Deserialize;
use sha2::{Digest, Sha256};

const ALL: &str = r#"formats = ["qcow2", "raw", "vmdk", "vhd", "gce", "containerdisk"]"#;
/// Every export row of a build of [`ALL`] (the qcow2 is the primary disk).
const EXPORTS: [&str; 5] = [
    "export/raw",
    "export/vmdk",
    "export/vhd",
    "export/gce",
    "export/containerdisk",
];
const MIB: u64 = 1 << 20;

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn run(program: &str, args: &[&OsStr]) -> String {
    let (stdout, _) = tool(program, args, &[]);
    String::from_utf8_lossy(&stdout).into_owned()
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

#[derive(Debug, Deserialize)]
struct Info {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "format-specific")]
    specific: Option<serde_json::Value>,
}

/// `qemu-img info` of `path` read as `format` (probed when `None`).
fn info(path: &Path, format: Option<&str>) -> Info {
    let mut args = vec![os("info"), os("--output=json")];
    if let Some(f) = format {
        args.extend([os("-f"), os(f)]);
    }
    args.push(path.as_os_str());
    serde_json::from_str(&run("qemu-img", &args)).unwrap()
}

/// `qemu-img compare` says the two disks hold the same bytes.
#[track_caller]
fn assert_same_disk(a: &Path, a_format: &str, b: &Path, b_format: &str) {
    let out = run(
        "qemu-img",
        &[
            os("compare"),
            os("-f"),
            os(a_format),
            os("-F"),
            os(b_format),
            a.as_os_str(),
            b.as_os_str(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

#[derive(Debug, Deserialize)]
struct Manifest {
    image: ManifestImage,
    outputs: Vec<Output>,
}

#[derive(Debug, Deserialize)]
struct ManifestImage {
    file: String,
    sha256: String,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Output {
    file: String,
    format: String,
    sha256: String,
    bytes: u64,
}

#[test]
fn every_format_is_written_reads_back_as_the_same_disk_and_is_cached() {
    require_build();
    require_inspect();
    require_tools(&[("skopeo", "skopeo"), ("tar", "tar"), ("gzip", "gzip")]);
    let d = RecipeDir::new();
    d.write("files/id", nonce());
    let kiln = Kiln::shared();
    let layers = r#"
[[layer]]
name = "id"
files = [{ src = "files/id", dest = "/etc/kiln-formats-test" }]
"#;
    let text =
        recipe("kt-formats", layers).replace("size = \"2GiB\"", &format!("size = \"1GiB\"\n{ALL}"));
    let path = d.write_recipe("formats.toml", text, &kiln);
    let plan = kiln.plan(&path);
    let mut cleanup = ForgetOnDrop::new(&kiln.store);
    // The image's entry holds its exports: they go with it.
    cleanup.add(&plan, &["id/files", "image"]);

    let first = kiln.build(&path, &[]);
    for stage in EXPORTS {
        assert_eq!(first.row(stage).status, "built", "{stage}");
    }
    assert!(
        !first.rows.iter().any(|r| r.stage == "export/qcow2"),
        "the primary qcow2 is not converted again: {:#?}",
        first.rows
    );
    let out = &kiln.out;
    let file = |suffix: &str| out.join(format!("kt-formats.{suffix}"));
    let qcow2 = file("qcow2");
    assert_eq!(first.image, qcow2);

    // The manifest lists each file with its digest; the primary stays the image.
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(file("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.image.file, "kt-formats.qcow2");
    assert_eq!(manifest.image.sha256, first.sha256);
    let listed: Vec<(&str, &str)> = manifest
        .outputs
        .iter()
        .map(|o| (o.format.as_str(), o.file.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("raw", "kt-formats.raw"),
            ("vmdk", "kt-formats.vmdk"),
            ("vhd", "kt-formats.vhd"),
            ("gce", "kt-formats.gce.tar.gz"),
            ("containerdisk", "kt-formats.containerdisk.tar"),
        ]
    );
    for o in &manifest.outputs {
        let p = out.join(&o.file);
        assert_eq!(sha256_file(&p), o.sha256, "{}", o.file);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), o.bytes, "{}", o.file);
    }

    // raw, vmdk: qemu-img recognises each, and each is the qcow2's disk.
    let raw = file("raw");
    assert_eq!(info(&raw, None).format, "raw");
    assert_same_disk(&raw, "raw", &qcow2, "qcow2");
    let vmdk = info(&file("vmdk"), None);
    assert_eq!(vmdk.format, "vmdk");
    let create_type = &vmdk.specific.expect("vmdk details")["data"]["create-type"];
    assert_eq!(create_type, "streamOptimized");
    assert_same_disk(&file("vmdk"), "vmdk", &qcow2, "qcow2");

    // vhd: a fixed VPC image (the disk, then a 512-byte footer; qemu-img's
    // probe takes a fixed VHD for raw, so it is read as vpc by name) whose
    // virtual size is a whole number of MiB, as Azure requires.
    let vhd = file("vhd");
    let vpc = info(&vhd, Some("vpc"));
    assert_eq!(vpc.format, "vpc");
    assert_eq!(vpc.virtual_size % MIB, 0, "{} bytes", vpc.virtual_size);
    assert_eq!(vpc.virtual_size, info(&qcow2, None).virtual_size);
    assert_eq!(
        std::fs::metadata(&vhd).unwrap().len(),
        vpc.virtual_size + 512
    );
    let mut footer = vec![0u8; 512];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&vhd).unwrap();
        f.seek(SeekFrom::End(-512)).unwrap();
        f.read_exact(&mut footer).unwrap();
    }
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(&footer[60..64], &2u32.to_be_bytes(), "disk type 2: fixed");
    assert_same_disk(&vhd, "vpc", &qcow2, "qcow2");

    // gce: a gzip'd GNU tar (old format, sparse) holding exactly disk.raw.
    let gce = file("gce.tar.gz");
    let listing = run(
        "tar",
        &[os("--list"), os("--gzip"), os("--file"), gce.as_os_str()],
    );
    assert_eq!(listing, "disk.raw\n");
    let (head, _) = tool(
        "sh",
        &[
            os("-c"),
            os("gzip -dc \"$1\" | head -c 512"),
            os("sh"),
            gce.as_os_str(),
        ],
        &[],
    );
    assert_eq!(&head[257..265], b"ustar  \0", "GNU (oldgnu) magic");
    assert_eq!(head[156], b'S', "a sparse member");
    let unpacked = temp_dir("kiln-formats-gce-");
    run(
        "tar",
        &[
            os("--extract"),
            os("--sparse"),
            os("--gzip"),
            os("--file"),
            gce.as_os_str(),
            os("--directory"),
            unpacked.path().as_os_str(),
        ],
    );
    assert_same_disk(&unpacked.path().join("disk.raw"), "raw", &qcow2, "qcow2");
    drop(unpacked);

    // containerdisk: an OCI archive skopeo reads, whose one layer holds
    // /disk/NAME.qcow2 for KubeVirt's qemu user (107), read-only.
    let archive = file("containerdisk.tar");
    let inspect = |reference: String| -> serde_json::Value {
        serde_json::from_str(&run(
            "skopeo",
            &[os("inspect"), os("--raw"), os(&reference)],
        ))
        .unwrap()
    };
    let from_archive = inspect(format!("oci-archive:{}", archive.display()));
    let layout = temp_dir("kiln-formats-oci-");
    run(
        "tar",
        &[
            os("--extract"),
            os("--file"),
            archive.as_os_str(),
            os("--directory"),
            layout.path().as_os_str(),
        ],
    );
    let from_dir = inspect(format!("oci:{}", layout.path().display()));
    assert_eq!(from_archive, from_dir);
    let summary: serde_json::Value = serde_json::from_str(&run(
        "skopeo",
        &[
            os("inspect"),
            os(&format!("oci:{}", layout.path().display())),
        ],
    ))
    .unwrap();
    assert_eq!(summary["Architecture"], "amd64");
    assert_eq!(summary["Os"], "linux");
    let layers = from_dir["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{from_dir:#}");
    let digest = layers[0]["digest"].as_str().unwrap();
    let blob = layout
        .path()
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    assert_eq!(format!("sha256:{}", sha256_file(&blob)), digest);
    let members = run(
        "tar",
        &[
            os("--list"),
            os("--verbose"),
            os("--numeric-owner"),
            os("--gzip"),
            os("--file"),
            blob.as_os_str(),
        ],
    );
    let disk_line = members
        .lines()
        .find(|l| l.ends_with(" disk/kt-formats.qcow2"))
        .unwrap_or_else(|| panic!("no disk/kt-formats.qcow2 in the layer:\n{members}"));
    assert!(disk_line.starts_with("-r--r----- 107/107 "), "{disk_line}");
    let inner = layout.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    run(
        "tar",
        &[
            os("--extract"),
            os("--gzip"),
            os("--file"),
            blob.as_os_str(),
            os("--directory"),
            inner.as_os_str(),
        ],
    );
    assert_eq!(
        sha256_file(&inner.join("disk/kt-formats.qcow2")),
        first.sha256,
        "the layer carries the primary qcow2 itself"
    );
    drop(layout);

    // A no-op rebuild converts and copies nothing.
    let stamps: Vec<(PathBuf, std::time::SystemTime)> = manifest
        .outputs
        .iter()
        .map(|o| {
            let p = out.join(&o.file);
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, m)
        })
        .collect();
    let again = kiln.build(&path, &[]);
    for stage in EXPORTS {
        assert_eq!(again.row(stage).status, "cached", "{stage}");
        assert_eq!(again.row(stage).key, first.row(stage).key, "{stage}");
    }
    for (p, mtime) in &stamps {
        assert_eq!(
            &std::fs::metadata(p).unwrap().modified().unwrap(),
            mtime,
            "{} was written again",
            p.display()
        );
    }
    let log = std::fs::read_to_string(out.join("kt-formats.build.log")).unwrap();
    assert!(
        !log.contains("qemu-img convert") && !log.contains("$ tar ") && !log.contains("$ cp "),
        "a no-op rebuild ran a conversion or a copy:\n{log}"
    );

    // The same image converted again gives the same bytes: nothing of
    // "now" or of a random id is in any of them.
    let exports = kiln
        .store
        .join("images-v1")
        .join(plan.image_key())
        .join("exports");
    assert!(exports.is_dir(), "{}", exports.display());
    std::fs::remove_dir_all(&exports).unwrap();
    let third = kiln.build(&path, &[]);
    for stage in EXPORTS {
        assert_eq!(third.row(stage).status, "built", "{stage}");
    }
    let remade: Manifest =
        serde_json::from_slice(&std::fs::read(file("manifest.json")).unwrap()).unwrap();
    assert_eq!(remade.outputs, manifest.outputs);
}

#[test]
fn a_format_whose_tool_is_missing_fails_before_the_store_is_touched() {
    require_root();
    let d = RecipeDir::new();
    let scratch = temp_dir("kiln-formats-notool-");
    let store = scratch.path().join("store");
    let kiln = Kiln::with_store(&store);
    let text =
        recipe("kt-notool", "").replace("size = \"2GiB\"", "size = \"2GiB\"\nformats = [\"gce\"]");
    let path = d.write("notool.toml", text);
    let bin = scratch.path().join("bin");
    let run = kiln.run_in(
        &[os("build"), os("--no-smoke"), path.as_os_str()],
        &[("PATH", path_without(&bin, "gzip").to_str().unwrap())],
        None,
    );
    run.assert_code(1);
    assert!(
        run.stderr.contains("gzip (package gzip)") && run.stderr.contains("apt-get install"),
        "{}",
        run.show()
    );
    assert!(!store.exists(), "the store was made");
}

#[derive(Debug, Deserialize)]
struct ExportReport {
    outputs: Vec<Output>,
    rows: Vec<ExportRow>,
}

#[derive(Debug, Deserialize)]
struct ExportRow {
    stage: String,
    status: String,
}

/// The subjects of the signed statement in `envelope` (a DSSE JSON line).
fn signed_subjects(envelope: &Path) -> Vec<(String, String)> {
    use base64::Engine;
    let text = std::fs::read_to_string(envelope).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(line["payload"].as_str().unwrap())
        .unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    statement["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["digest"]["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A signed build with `formats = ["raw"]`: the raw file is a subject of
/// the signed statement, and `kiln verify --trusted-key` catches a change
/// to it. `kiln export` then adds a VMDK beside the image from the store
/// (the raw it finds cached), converts nothing the second time, and leaves
/// the records as the build wrote and signed them. Nothing here boots.
#[test]
fn export_adds_formats_beside_a_built_image_and_signed_outputs_are_checked() {
    require_build();
    require_inspect();
    let d = RecipeDir::new();
    d.write("files/id", nonce());
    let kiln = Kiln::shared();
    let keys = temp_dir("kiln-export-keys-");
    kiln.run(&[
        os("key"),
        os("new"),
        os("alice"),
        os("--dir"),
        keys.path().as_os_str(),
    ])
    .assert_code(0);
    let layers = r#"
[[layer]]
name = "id"
files = [{ src = "files/id", dest = "/etc/kiln-export-test" }]
"#;
    let text = recipe("kt-export", layers)
        .replace("size = \"2GiB\"", "size = \"1GiB\"\nformats = [\"raw\"]");
    let path = d.write_recipe("export.toml", text, &kiln);
    let plan = kiln.plan(&path);
    let mut cleanup = ForgetOnDrop::new(&kiln.store);
    cleanup.add(&plan, &["id/files", "image"]);
    let key = keys.path().join("alice.key");
    let built = kiln.build(&path, &["--signing-key", key.to_str().unwrap()]);
    assert_eq!(built.row("export/raw").status, "built");

    let out = &kiln.out;
    let file = |suffix: &str| out.join(format!("kt-export.{suffix}"));
    let (qcow2, raw, vmdk) = (file("qcow2"), file("raw"), file("vmdk"));
    let envelope = file("provenance.intoto.jsonl");
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(file("manifest.json")).unwrap()).unwrap();
    let subjects = signed_subjects(&envelope);
    let names: Vec<&str> = subjects.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "kt-export.qcow2",
            "kt-export.manifest.json",
            "kt-export.raw"
        ]
    );
    assert_eq!(subjects[2].1, manifest.outputs[0].sha256);
    assert_eq!(subjects[2].1, sha256_file(&raw));
    let public = keys.path().join("alice.pub");
    let verify = || {
        kiln.run(&[
            os("verify"),
            qcow2.as_os_str(),
            os("--trusted-key"),
            public.as_os_str(),
        ])
    };
    verify().assert_code(0);

    // kiln export: a new format, and one the build already made (cached).
    let records = [file("manifest.json"), envelope.clone()].map(|p| std::fs::read(p).unwrap());
    let export = |formats: &[&str]| {
        let mut args = vec![os("export"), qcow2.as_os_str(), os("--json")];
        for f in formats {
            args.extend([os("--format"), os(*f)]);
        }
        kiln.run(&args)
    };
    let first = export(&["vmdk", "raw"]);
    first.assert_code(0);
    let report: ExportReport = first.json();
    let rows: Vec<(&str, &str)> = report
        .rows
        .iter()
        .map(|r| (r.stage.as_str(), r.status.as_str()))
        .collect();
    assert_eq!(
        rows,
        [("export/vmdk", "built"), ("export/raw", "cached")],
        "{}",
        first.show()
    );
    assert_eq!(report.outputs[0].file, "kt-export.vmdk");
    assert_eq!(report.outputs[0].sha256, sha256_file(&vmdk));
    assert_eq!(report.outputs[1].sha256, manifest.outputs[0].sha256);
    assert_eq!(info(&vmdk, None).format, "vmdk");
    assert_same_disk(&vmdk, "vmdk", &qcow2, "qcow2");
    for (p, before) in [file("manifest.json"), envelope.clone()]
        .iter()
        .zip(&records)
    {
        assert_eq!(
            &std::fs::read(p).unwrap(),
            before,
            "{} changed",
            p.display()
        );
    }
    let mtime = std::fs::metadata(&vmdk).unwrap().modified().unwrap();
    let again: ExportReport = export(&["vmdk"]).json();
    assert_eq!(again.rows[0].status, "cached");
    assert_eq!(std::fs::metadata(&vmdk).unwrap().modified().unwrap(), mtime);

    // Bad input: a format kiln does not write (exit 2); an image whose
    // store entry is gone (another, empty store: exit 1, says to rebuild).
    let bad = export(&["iso"]);
    bad.assert_code(2);
    assert!(bad.stderr.contains("--format iso"), "{}", bad.show());
    let empty = temp_dir("kiln-export-empty-");
    let elsewhere = Kiln::at(&empty.path().join("store"), out);
    let gone = elsewhere.run(&[os("export"), qcow2.as_os_str(), os("--format"), os("vhd")]);
    gone.assert_code(1);
    assert!(
        gone.stderr.contains("is not in the store") && gone.stderr.contains("kiln build"),
        "{}",
        gone.show()
    );
    assert!(!file("vhd").exists());

    // A changed byte in the signed raw file: verify names it, exit 4.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"X").unwrap();
    }
    let tampered = verify();
    tampered.assert_code(4);
    assert!(
        tampered
            .stdout
            .contains("output digest differs from the signed one (kt-export.raw)")
            || tampered
                .stderr
                .contains("output digest differs from the signed one (kt-export.raw)"),
        "{}",
        tampered.show()
    );
}
