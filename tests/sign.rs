//! Signing: `kiln key new`, `kiln build --signing-key`, `kiln verify
//! --trusted-key`, and an independent verifier (securesystemslib, from the
//! venv `make deps` makes) that accepts kiln's envelope.
//!
//! One real build (`--no-smoke`: the boot is not the point) into the shared
//! warm store serves every signature check; two no-op rebuilds show that
//! the envelope is byte-identical for the same inputs and key, and that a
//! build without a key removes a stale one. Key files are checked without
//! building: a bad key is refused before anything is built.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{Kiln, RecipeDir};
use serde_json::Value;

const PYTHON: &str = "/opt/kiln/venv/bin/python";
const IN_TOTO: &str = "application/vnd.in-toto+json";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `kiln key new NAME --dir DIR EXTRA…`.
fn key_new(kiln: &Kiln, dir: &Path, name: &str, extra: &[&str]) -> common::Run {
    let mut args = vec!["key", "new", name, "--dir", dir.to_str().unwrap()];
    args.extend(extra);
    kiln.run(&args)
}

/// Exit 2 and an error naming `file`, saying `says`, with a fix.
#[track_caller]
fn assert_key_refused(run: &common::Run, file: &Path, says: &str) {
    run.assert_code(2);
    for want in [file.display().to_string(), says.to_owned(), "fix: ".into()] {
        assert!(
            run.stderr.contains(&want),
            "no `{want}` in:\n{}",
            run.show()
        );
    }
}

#[test]
fn quick_key_files_modes_and_refusals() {
    let kiln = Kiln::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");

    key_new(&kiln, &dir, "alice", &[]).assert_code(0);
    let key = dir.join("alice.key");
    let public = dir.join("alice.pub");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&public), 0o644);
    let pub_text = std::fs::read_to_string(&public).unwrap();
    let (name, b64) = pub_text.trim_end().split_once(':').unwrap();
    assert_eq!(name, "alice");
    assert_eq!(pub_text.lines().count(), 1, "{pub_text}");
    assert_eq!(base64_len(b64), 32, "{pub_text}");
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(key_text.starts_with("alice:"), "a key file names its key");
    // Nix's secret key: seed then public key, 64 bytes; its tail is the .pub.
    assert_eq!(
        base64_len(key_text.trim_end().split_once(':').unwrap().1),
        64
    );

    // Never overwritten, neither file.
    let run = key_new(&kiln, &dir, "alice", &[]);
    assert_key_refused(&run, &key, "already exists");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), key_text);
    std::fs::rename(&key, dir.join("moved.key")).unwrap();
    assert_key_refused(
        &key_new(&kiln, &dir, "alice", &[]),
        &public,
        "already exists",
    );
    assert!(!key.exists(), "a refused `key new` left a key behind");
    std::fs::rename(dir.join("moved.key"), &key).unwrap();

    // The Secure Boot pair: an RSA key and a self-signed certificate.
    common::require_tools(&[("openssl", "openssl")]);
    key_new(&kiln, &dir, "sb", &["--secure-boot"]).assert_code(0);
    assert_eq!(mode(&dir.join("sb.key")), 0o600);
    assert_eq!(mode(&dir.join("sb.sb.key")), 0o600);
    assert_eq!(mode(&dir.join("sb.sb.crt")), 0o644);
    let (subject, _) = common::tool(
        "openssl",
        &[
            "x509".as_ref(),
            "-noout".as_ref(),
            "-subject".as_ref(),
            "-in".as_ref(),
            dir.join("sb.sb.crt").as_os_str(),
        ],
        &[],
    );
    let subject = String::from_utf8_lossy(&subject);
    assert!(
        subject.contains("CN = sb") || subject.contains("CN=sb"),
        "{subject}"
    );
    let (rsa, _) = common::tool(
        "openssl",
        &[
            "rsa".as_ref(),
            "-noout".as_ref(),
            "-text".as_ref(),
            "-in".as_ref(),
            dir.join("sb.sb.key").as_os_str(),
        ],
        &[],
    );
    assert!(String::from_utf8_lossy(&rsa).contains("2048 bit"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    key_new(&kiln, &dir, "../evil", &[]).assert_code(2);

    // A bad key is refused before anything is built (no recipe is read).
    let recipe = tmp.path().join("never-read.toml");
    let build = |key: &Path| {
        kiln.run(&[
            "build",
            recipe.to_str().unwrap(),
            "--signing-key",
            key.to_str().unwrap(),
        ])
    };
    chmod(&key, 0o644);
    assert_key_refused(&build(&key), &key, "chmod 600");
    chmod(&key, 0o640);
    assert_key_refused(&build(&key), &key, "mode 0640");
    // The same through the environment.
    let run = kiln.run_in(
        &["build", recipe.to_str().unwrap()],
        &[("KILN_SIGNING_KEY", key.to_str().unwrap())],
        None,
    );
    assert_key_refused(&run, &key, "chmod 600");
    chmod(&key, 0o600);
    let garbage = dir.join("garbage.key");
    std::fs::write(&garbage, "alice:not base64!\n").unwrap();
    chmod(&garbage, 0o600);
    assert_key_refused(&build(&garbage), &garbage, "not a kiln signing key");
    assert_key_refused(&build(&public), &public, "this is a public key");
    assert_key_refused(
        &build(&dir.join("missing.key")),
        &dir.join("missing.key"),
        "does not exist",
    );
    // A trusted key that is no public key.
    let run = kiln.run(&[
        "verify",
        "out/x.qcow2",
        "--trusted-key",
        key.to_str().unwrap(),
    ]);
    assert_key_refused(&run, &key, "this is a private key");
}

/// Bytes of a base64 text.
fn base64_len(b64: &str) -> usize {
    STANDARD.decode(b64.trim()).unwrap().len()
}

struct Built {
    out: PathBuf,
    disk: PathBuf,
    manifest: PathBuf,
    envelope: PathBuf,
}

fn built(kiln: &Kiln, name: &str) -> Built {
    Built {
        out: kiln.out.clone(),
        disk: kiln.out.join(format!("{name}.qcow2")),
        manifest: kiln.out.join(format!("{name}.manifest.json")),
        envelope: kiln.out.join(format!("{name}.provenance.intoto.jsonl")),
    }
}

fn verify(kiln: &Kiln, disk: &Path, keys: &[&Path]) -> common::Run {
    let mut args = vec!["verify".to_owned(), disk.display().to_string()];
    for k in keys {
        args.extend(["--trusted-key".to_owned(), k.display().to_string()]);
    }
    kiln.run(&args)
}

/// Flip the lowest bit of the byte at `offset` (flipping it again undoes it).
fn flip(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
}

#[test]
fn a_signed_build_verifies_and_any_change_is_caught() {
    common::require_build();
    common::require_tools(&[("debugfs", "e2fsprogs")]);
    assert!(
        Path::new(PYTHON).is_file(),
        "{PYTHON} is missing: the independent DSSE verifier (securesystemslib) lives in that venv; run `make deps` as root"
    );
    let kiln = Kiln::shared();
    let keys = tempfile::tempdir().unwrap();
    key_new(&kiln, keys.path(), "alice", &[]).assert_code(0);
    key_new(&kiln, keys.path(), "mallory", &[]).assert_code(0);
    let alice = keys.path().join("alice.key");
    let alice_pub = keys.path().join("alice.pub");
    let mallory_pub = keys.path().join("mallory.pub");

    let name = format!("sign-{}", common::nonce().replace('-', ""));
    let dir = RecipeDir::new();
    let recipe = dir.write_recipe(
        "sign.toml",
        common::recipe(
            &name,
            "[[layer]]\nname = \"tag\"\nrun = [\"echo signed > /etc/kiln-sign\"]\n",
        ),
        &kiln,
    );
    let run = kiln.run(&[
        "build",
        "--no-smoke",
        recipe.to_str().unwrap(),
        "--signing-key",
        alice.to_str().unwrap(),
    ]);
    run.assert_code(0);
    let b = built(&kiln, &name);
    assert!(
        run.stdout
            .contains(&format!("signed by key alice: {}", b.envelope.display())),
        "{}",
        run.show()
    );

    // The envelope: one line, DSSE, in-toto, keyid alice; its payload is
    // the provenance file, whose subjects are the disk and the manifest.
    let line = std::fs::read_to_string(&b.envelope).unwrap();
    assert_eq!(mode(&b.envelope), 0o644);
    assert_eq!(line.lines().count(), 1);
    let env: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(env["payloadType"], IN_TOTO);
    assert_eq!(env["signatures"][0]["keyid"], "alice");
    let payload = STANDARD.decode(env["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        payload,
        std::fs::read(b.out.join(format!("{name}.provenance.json"))).unwrap()
    );
    let statement: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    let subjects: Vec<(String, String)> = statement["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["digest"]["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        subjects,
        vec![
            (format!("{name}.qcow2"), sha256(&b.disk)),
            (format!("{name}.manifest.json"), sha256(&b.manifest)),
        ]
    );

    // The independent verifier accepts it, with alice's key only.
    python_verify(&b.envelope, &alice_pub, "alice")
        .expect("securesystemslib rejects kiln's envelope");
    assert!(
        python_verify(&b.envelope, &mallory_pub, "alice").is_err(),
        "securesystemslib accepted another key"
    );

    // `kiln inspect` names the signer.
    let run = kiln.run(&["inspect", b.disk.to_str().unwrap()]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("signed      by key alice"),
        "{}",
        run.show()
    );

    // Right key: clean. Another key: exit 4. Both trusted (a rotation): clean.
    let run = kiln.run(&[
        "--json",
        "verify",
        b.disk.to_str().unwrap(),
        "--trusted-key",
        alice_pub.to_str().unwrap(),
    ]);
    run.assert_code(0);
    let report: Value = run.json();
    assert_eq!(
        report["signature"]["signed_by"],
        serde_json::json!(["alice"])
    );
    assert_eq!(report["clean"], true);
    let run = verify(&kiln, &b.disk, &[&mallory_pub]);
    run.assert_code(4);
    assert!(
        run.stdout
            .contains("signature: not signed by a trusted key")
            && run
                .stderr
                .contains("signature: not signed by a trusted key"),
        "{}",
        run.show()
    );
    verify(&kiln, &b.disk, &[&mallory_pub, &alice_pub]).assert_code(0);

    // One changed byte in the envelope's payload: the signature fails.
    let mut tampered = env.clone();
    let mut p = payload.clone();
    let at = p.len() / 2;
    p[at] ^= 0x01;
    tampered["payload"] = STANDARD.encode(&p).into();
    std::fs::write(&b.envelope, format!("{tampered}\n")).unwrap();
    let run = verify(&kiln, &b.disk, &[&alice_pub]);
    run.assert_code(4);
    assert!(
        run.stderr
            .contains("signature: not signed by a trusted key"),
        "{}",
        run.show()
    );
    std::fs::write(&b.envelope, &line).unwrap();

    // One changed byte in the disk: the disk subject differs.
    let offset = std::fs::metadata(&b.disk).unwrap().len() / 2;
    flip(&b.disk, offset);
    let run = verify(&kiln, &b.disk, &[&alice_pub]);
    run.assert_code(4);
    assert!(
        run.stderr
            .contains("subject: disk digest differs from the signed one"),
        "{}",
        run.show()
    );
    assert!(!run.stderr.contains("manifest digest"), "{}", run.show());
    flip(&b.disk, offset);
    assert_eq!(sha256(&b.disk), subjects[0].1);

    // Same inputs, same key: a rebuild (a no-op, into another out folder)
    // writes the same records and a byte-identical envelope.
    let again = Kiln::with_store(&kiln.store);
    again
        .run(&[
            "build",
            "--no-smoke",
            recipe.to_str().unwrap(),
            "--signing-key",
            alice.to_str().unwrap(),
        ])
        .assert_code(0);
    let b2 = built(&again, &name);
    assert_eq!(std::fs::read_to_string(&b2.envelope).unwrap(), line);
    assert_eq!(
        std::fs::read(&b2.manifest).unwrap(),
        std::fs::read(&b.manifest).unwrap()
    );

    // A build without a key leaves no envelope that no longer matches.
    let run = kiln.run(&["build", "--no-smoke", recipe.to_str().unwrap()]);
    run.assert_code(0);
    assert!(
        !b.envelope.exists(),
        "a build without a key kept the old envelope"
    );
    assert!(run.stderr.contains("removed"), "{}", run.show());
    let run = verify(&kiln, &b.disk, &[&alice_pub]);
    run.assert_code(4);
    assert!(
        run.stderr
            .contains(&format!("no signature file: {}", b.envelope.display())),
        "{}",
        run.show()
    );
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Run a Python snippet in the venv, `args` as sys.argv[1:]; its stdout.
fn python(code: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut cmd = std::process::Command::new(PYTHON);
    cmd.arg("-c").arg(code).args(args);
    let done = common::run_with_deadline(cmd, common::TOOL_TIMEOUT)?;
    if done.status.success() {
        Ok(done.stdout)
    } else {
        Err(String::from_utf8_lossy(&done.stderr).into_owned())
    }
}

/// securesystemslib's DSSE verifier, with the raw Ed25519 key of `public`
/// (a kiln NAME.pub) as an SSlibKey whose keyid is `keyid`.
fn python_verify(envelope: &Path, public: &Path, keyid: &str) -> Result<(), String> {
    const VERIFY: &str = r#"
import base64, json, sys
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
envelope, public, keyid = sys.argv[1:]
raw = base64.b64decode(open(public).read().strip().split(":", 1)[1])
key = SSlibKey(keyid, "ed25519", "ed25519", {"public": raw.hex()})
with open(envelope) as f:
    env = Envelope.from_dict(json.loads(f.readline()))
assert env.payload_type == "application/vnd.in-toto+json", env.payload_type
env.verify([key], 1)
assert json.loads(env.payload)["predicateType"] == "https://slsa.dev/provenance/v1"
"#;
    python(
        VERIFY,
        &[envelope.to_str().unwrap(), public.to_str().unwrap(), keyid],
    )
    .map(|_| ())
}
