//! The remote layer cache, against a real registry: Debian's
//! `docker-registry` (distribution 2.8) started on a free loopback port
//! with its own config and storage dir, and stopped when the test ends.
//!
//! Two machines are two stores: the shared warm store builds and pushes
//! (`--push`, signed), an empty store pulls. The refusals run in small
//! stores seeded with the base layer, so that only the small layers are
//! pulled or built.

mod common;

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The registry answers `/v2/` within this after it starts.
const REGISTRY_START: Duration = Duration::from_secs(20);
const REPO: &str = "team/kiln";

/// Programs the registry tests run besides kiln's build tools.
const REGISTRY_TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/docker-registry", "docker-registry"),
    ("htpasswd", "apache2-utils"),
    ("zstd", "zstd"),
];

/// A `docker-registry serve` of our own; killed on drop.
struct Registry {
    dir: tempfile::TempDir,
    addr: String,
    child: Option<Child>,
}

impl Registry {
    /// Started with `htpasswd` auth when `users` is not empty.
    fn start(users: &[(&str, &str)]) -> Registry {
        require_tools(REGISTRY_TOOLS);
        let dir = temp_dir("kiln-registry-");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if !users.is_empty() {
            let file = dir.path().join("htpasswd");
            for (i, (user, password)) in users.iter().enumerate() {
                let mut args = vec!["-B", "-b"];
                if i == 0 {
                    args.push("-c");
                }
                let file = file.to_str().unwrap();
                args.extend([file, user, password]);
                let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
                tool("htpasswd", &args, &[]);
            }
            auth = format!(
                "auth: {{ htpasswd: {{ realm: kiln-test, path: {} }} }}\n",
                file.display()
            );
        }
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{ level: warn }}\nstorage: {{ filesystem: {{ rootdirectory: {} }}, delete: {{ enabled: true }} }}\nhttp: {{ addr: {addr} }}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Registry {
            dir,
            addr,
            child: Some(child),
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                started.elapsed() < REGISTRY_START,
                "docker-registry did not listen on {} within {REGISTRY_START:?}:\n{}",
                registry.addr,
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }

    fn reference(&self) -> String {
        format!("oci+http://{}/{REPO}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The registry is ours alone: kill it by its pid, then reap it.
            child.kill().expect("killing docker-registry");
            child.wait().expect("reaping docker-registry");
        }
    }

    fn storage(&self) -> PathBuf {
        self.dir.path().join("data/docker/registry/v2")
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.storage()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The manifest tagged for a layer key, read from the storage dir.
    fn layer_manifest(&self, key: &str) -> serde_json::Value {
        let link = self
            .storage()
            .join("repositories")
            .join(REPO)
            .join(format!("_manifests/tags/kl1-{key}/current/link"));
        let digest =
            std::fs::read_to_string(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
        let bytes = std::fs::read(self.blob_path(digest.trim())).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The blob of a layer key.
    fn layer_blob(&self, key: &str) -> PathBuf {
        let manifest = self.layer_manifest(key);
        self.blob_path(manifest["layers"][0]["digest"].as_str().unwrap())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keys made with `kiln key new`: `ci` signs, `other` is not trusted.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new(kiln: &Kiln) -> Keys {
        let dir = temp_dir("kiln-remote-keys-");
        for name in ["ci", "other"] {
            kiln.run(&[
                OsStr::new("key"),
                OsStr::new("new"),
                OsStr::new(name),
                OsStr::new("--dir"),
                dir.path().as_os_str(),
            ])
            .assert_code(0);
        }
        Keys { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// Small layers on golden's base: a file, and a run step that leaves an
/// overlayfs whiteout (a deleted file) and an opaque directory (one
/// removed and made again), which a pulled layer must keep.
const LAYERS: &str = r#"
[[layer]]
name = "tools"
files = [{ src = "files/hello.txt", dest = "/opt/kiln-remote/hello.txt", mode = "0640" }]
run = ["rm /etc/issue.net", "rm -rf /usr/share/doc/apt && mkdir /usr/share/doc/apt && echo new > /usr/share/doc/apt/README"]
"#;

fn write_recipe(d: &RecipeDir, kiln: &Kiln) -> PathBuf {
    d.write("files/hello.txt", "hello from the shared cache\n");
    d.write_recipe("remote.toml", recipe("kt-remote", LAYERS), kiln)
}

/// A fresh store holding only the base layer (copied from the warm store).
fn seeded_store(from: &Kiln, plan: &PlanReport) -> tempfile::TempDir {
    let store = temp_dir("kiln-remote-store-");
    copy_entries(&from.store, store.path(), &[plan.step("base").key.clone()]);
    store
}

fn warnings(run: &Run) -> Vec<String> {
    run.stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .map(str::to_owned)
        .collect()
}

/// The digests of a layer's seal (every path's type, mode, owner, xattrs
/// and size, and every file's content), without the time it was sealed.
fn sealed_digests(store: &Path, key: &str) -> Vec<serde_json::Value> {
    let path = store.join("layers-v1").join(key).join("integrity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let seal: serde_json::Value = serde_json::from_str(&text).unwrap();
    ["files", "bytes", "meta", "content"]
        .map(|k| seal[k].clone())
        .to_vec()
}

/// An extended attribute of a path (not following a symlink).
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let c_name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length given.
    let n = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

fn cache_verify_clean(kiln: &Kiln) {
    let run = kiln.run(&["cache", "verify"]);
    run.assert_code(0);
    assert!(
        !run.stdout.contains("corrupt"),
        "kiln cache verify found damage:\n{}",
        run.show()
    );
}

#[test]
fn an_empty_store_pulls_every_layer_and_assembles_the_same_disk() {
    require_build();
    let registry = Registry::start(&[]);
    let a = Kiln::shared();
    let keys = Keys::new(&a);
    let d = RecipeDir::new();
    let recipe = write_recipe(&d, &a);
    let remote = registry.reference();

    // The builder: push needs a signing key, and says what it pushed.
    let built = a.run(&[
        OsStr::new("--json"),
        OsStr::new("build"),
        recipe.as_os_str(),
        OsStr::new("--no-smoke"),
        OsStr::new("--remote"),
        OsStr::new(&remote),
        OsStr::new("--push"),
        OsStr::new("--signing-key"),
        OsStr::new(&keys.path("ci.key")),
    ]);
    built.assert_code(0);
    let first: BuildReport = built.json();
    let plan = a.plan(&recipe);
    for (stage, key) in plan.layer_keys() {
        assert!(
            built
                .stderr
                .contains(&format!("pushed {stage} ({})", &key[..12])),
            "{stage} was not pushed:\n{}",
            built.show()
        );
        let manifest = registry.layer_manifest(&key);
        assert_eq!(manifest["artifactType"], "application/vnd.kiln.layer.v1");
        assert_eq!(
            manifest["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        assert_eq!(manifest["annotations"]["dev.kiln.keyid"], "ci");
    }
    // Pushing a key that is there is a no-op.
    let again = a.run(&[
        OsStr::new("build"),
        recipe.as_os_str(),
        OsStr::new("--no-smoke"),
        OsStr::new("--remote"),
        OsStr::new(&remote),
        OsStr::new("--push"),
        OsStr::new("--signing-key"),
        OsStr::new(&keys.path("ci.key")),
    ]);
    again.assert_code(0);
    assert!(
        !again.stderr.lines().any(|l| l.starts_with("pushed "))
            && again.stderr.contains("4 entries were already in"),
        "{}",
        again.show()
    );

    // The reader: an empty store, the CI key trusted.
    let store_b = temp_dir("kiln-remote-store-");
    let b = Kiln::with_store(store_b.path());
    let trust = ["--remote", &remote, "--trusted-key", &keys.path("ci.pub")];
    let mut plan_args = vec!["--json", "plan", recipe.to_str().unwrap()];
    plan_args.extend(trust);
    let planned = b.run(&plan_args);
    planned.assert_code(0);
    let planned: serde_json::Value = planned.json();
    for step in planned["steps"].as_array().unwrap() {
        assert_eq!(step["remote"]["state"], "pull", "{planned:#}");
        assert_eq!(step["remote"]["signed_by"], "ci", "{planned:#}");
    }
    let pulled = b.build(&recipe, &trust);
    assert_eq!(
        pulled.statuses(),
        [
            ("base", "pulled"),
            ("tools/files", "pulled"),
            ("tools/run", "pulled"),
            ("image", "pulled")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned())),
        "{:#?}",
        pulled.rows
    );
    for row in pulled.rows.iter().filter(|r| r.status == "pulled") {
        assert!(
            row.bytes.is_some_and(|b| b > 0)
                && row
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("signed by ci")),
            "{row:#?}"
        );
    }
    assert_eq!(
        (&pulled.image_key, &pulled.sha256),
        (&first.image_key, &first.sha256),
        "the pulled image is not the pushed one"
    );
    assert!(
        built
            .stderr
            .contains(&format!("pushed image ({})", &first.image_key[..12])),
        "{}",
        built.show()
    );
    // Each layer as it was published in the builder's store: same paths,
    // types, modes, owners, xattrs, whiteouts and file contents.
    for (stage, key) in plan.layer_keys() {
        assert_eq!(
            sealed_digests(store_b.path(), &key),
            sealed_digests(&a.store, &key),
            "{stage}: the pulled layer differs from the pushed one"
        );
    }
    // Which covers the overlayfs marks the run step left.
    let run_tree = store_b
        .path()
        .join("layers-v1")
        .join(plan.step("tools/run").key.clone())
        .join("tree");
    use std::os::unix::fs::FileTypeExt;
    let whiteout = std::fs::symlink_metadata(run_tree.join("etc/issue.net")).unwrap();
    assert!(whiteout.file_type().is_char_device(), "no whiteout");
    assert_eq!(
        xattr(
            &run_tree.join("usr/share/doc/apt"),
            "trusted.overlay.opaque"
        )
        .as_deref(),
        Some(&b"y"[..]),
        "no opaque mark"
    );
    cache_verify_clean(&b);

    // Assembled from the pulled layers (the image entry removed, no
    // remote), the disk is byte-identical to the builder's.
    std::fs::remove_dir_all(store_b.path().join("images-v1").join(&first.image_key)).unwrap();
    let assembled = b.build(&recipe, &[]);
    assert_eq!(assembled.row("image").status, "built");
    assert_eq!(
        assembled.sha256, first.sha256,
        "the disk assembled from pulled layers is not byte-identical"
    );
}

#[test]
fn refused_layers_and_a_stopped_registry_fall_back_to_a_local_build() {
    require_build();
    let mut registry = Registry::start(&[]);
    let a = Kiln::shared();
    let keys = Keys::new(&a);
    let d = RecipeDir::new();
    let recipe = write_recipe(&d, &a);
    let remote = registry.reference();
    a.build(
        &recipe,
        &[
            "--remote",
            &remote,
            "--push",
            "--signing-key",
            &keys.path("ci.key"),
        ],
    );
    let plan = a.plan(&recipe);
    let key_of = |stage: &str| plan.step(stage).key.clone();

    // Without a trusted key the remote is not read, and kiln says so once.
    let store = seeded_store(&a, &plan);
    let kiln = Kiln::with_store(store.path());
    let run = kiln.run(&[
        "build",
        recipe.to_str().unwrap(),
        "--no-smoke",
        "--remote",
        &remote,
    ]);
    run.assert_code(0);
    assert_eq!(
        run.stderr.matches("is not read: no --trusted-key").count(),
        1,
        "{}",
        run.show()
    );
    assert!(run.stdout.contains("built"), "{}", run.show());

    // Signed by a key this reader does not trust: refused, built locally.
    let store = seeded_store(&a, &plan);
    let kiln = Kiln::with_store(store.path());
    let untrusted = [
        "--remote",
        &remote,
        "--trusted-key",
        &keys.path("other.pub"),
    ];
    let run = kiln.run(
        &[
            &["build", recipe.to_str().unwrap(), "--no-smoke"][..],
            &untrusted,
        ]
        .concat(),
    );
    run.assert_code(0);
    let said = warnings(&run);
    assert_eq!(said.len(), 3, "{}", run.show());
    for (line, stage) in said.iter().zip(["tools/files", "tools/run", "image"]) {
        assert!(
            line.contains(stage)
                && line.contains(&key_of(stage)[..12])
                && line.contains("does not verify against any trusted key (other)")
                && line.contains("building it locally"),
            "{line}"
        );
    }
    cache_verify_clean(&kiln);

    // A blob changed in the registry's storage (same size), and a blob
    // gone from it: each refused with its warning, built locally.
    let changed = registry.layer_blob(&key_of("tools/files"));
    let mut bytes = std::fs::read(&changed).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&changed, &bytes).unwrap();
    std::fs::remove_file(registry.layer_blob(&key_of("tools/run"))).unwrap();
    let store = seeded_store(&a, &plan);
    let kiln = Kiln::with_store(store.path());
    let trusted = ["--remote", &remote, "--trusted-key", &keys.path("ci.pub")];
    let run = kiln.run(
        &[
            &["--json", "build", recipe.to_str().unwrap(), "--no-smoke"][..],
            &trusted,
        ]
        .concat(),
    );
    run.assert_code(0);
    let report: BuildReport = run.json();
    assert_eq!(
        report.statuses()[1..3],
        [
            ("tools/files".to_owned(), "built".to_owned()),
            ("tools/run".to_owned(), "built".to_owned())
        ],
        "{:#?}",
        report.rows
    );
    let said = warnings(&run);
    assert_eq!(said.len(), 2, "{}", run.show());
    assert!(
        said[0].contains("tools/files") && said[0].contains("has the digest"),
        "{}",
        said[0]
    );
    assert!(
        said[1].contains("tools/run") && said[1].contains("404"),
        "{}",
        said[1]
    );
    cache_verify_clean(&kiln);

    // The registry stopped: one warning, the build succeeds locally.
    registry.stop();
    let store = seeded_store(&a, &plan);
    let kiln = Kiln::with_store(store.path());
    let run = kiln.run(
        &[
            &["build", recipe.to_str().unwrap(), "--no-smoke"][..],
            &trusted,
        ]
        .concat(),
    );
    run.assert_code(0);
    let said = warnings(&run);
    assert_eq!(said.len(), 1, "{}", run.show());
    assert!(
        said[0].contains("is unavailable") && said[0].contains("building locally"),
        "{}",
        said[0]
    );
}

#[test]
fn a_registry_with_htpasswd_takes_a_push_only_with_the_right_credentials() {
    require_build();
    const PASSWORD: &str = "kiln-s3cret-pw";
    let registry = Registry::start(&[("ci", PASSWORD)]);
    let a = Kiln::shared();
    let keys = Keys::new(&a);
    let d = RecipeDir::new();
    let recipe = write_recipe(&d, &a);
    let remote = registry.reference();
    let home = temp_dir("kiln-remote-home-");
    let auth_file = home.path().join("auth.json");
    let home_str = home.path().to_str().unwrap();
    let auth_str = auth_file.to_str().unwrap();
    // Only the file kiln is pointed at: not the host's own logins.
    let env = [
        ("REGISTRY_AUTH_FILE", auth_str),
        ("XDG_RUNTIME_DIR", home_str),
        ("DOCKER_CONFIG", home_str),
    ];
    let push = |env: &[(&str, &str)]| {
        a.run_in(
            &[
                "build",
                recipe.to_str().unwrap(),
                "--no-smoke",
                "--remote",
                &remote,
                "--push",
                "--signing-key",
                &keys.path("ci.key"),
            ],
            env,
            None,
        )
    };
    let login = |password: &str| {
        let auth = base64_of(&format!("ci:{password}"));
        std::fs::write(
            &auth_file,
            format!(
                r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
                registry.addr
            ),
        )
        .unwrap();
    };

    std::fs::write(&auth_file, r#"{"auths": {}}"#).unwrap();
    let run = push(&env);
    run.assert_code(1);
    assert!(
        run.stderr.contains("needs credentials") && run.stderr.contains("podman login"),
        "{}",
        run.show()
    );

    login("not-the-password");
    let run = push(&env);
    run.assert_code(1);
    assert!(
        run.stderr.contains("refused the credentials of user ci")
            && run.stderr.contains(auth_str)
            && !run.stderr.contains("not-the-password"),
        "{}",
        run.show()
    );

    login(PASSWORD);
    let run = push(&env);
    run.assert_code(0);
    assert!(
        run.stderr
            .lines()
            .filter(|l| l.starts_with("pushed "))
            .count()
            == 4,
        "{}",
        run.show()
    );
    // A reader with the same login sees every layer; no run printed the password.
    let empty = Kiln::with_store(&home.path().join("no-store"));
    let planned = empty.run_in(
        &[
            "--json",
            "plan",
            recipe.to_str().unwrap(),
            "--remote",
            &remote,
            "--trusted-key",
            &keys.path("ci.pub"),
        ],
        &env,
        None,
    );
    planned.assert_code(0);
    let states: serde_json::Value = planned.json();
    assert!(
        states["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["stage"] != "image")
            .all(|s| s["remote"]["state"] == "pull"),
        "{states:#}"
    );
    assert!(!planned.stdout.contains(PASSWORD) && !planned.stderr.contains(PASSWORD));
    let log = std::fs::read_to_string(a.out.join("kt-remote.build.log")).unwrap();
    assert!(!log.contains(PASSWORD) && !log.contains(&base64_of(&format!("ci:{PASSWORD}"))));
    assert!(!run.stderr.contains(PASSWORD));
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn kiln_push_then_pull_gives_the_same_disk_and_refuses_what_does_not_verify() {
    require_build();
    require_tools(&[("skopeo", "skopeo")]);
    let registry = Registry::start(&[]);
    let a = Kiln::shared();
    let keys = Keys::new(&a);
    let d = RecipeDir::new();
    let recipe = write_recipe(&d, &a);
    let built = a.build(&recipe, &["--signing-key", &keys.path("ci.key")]);
    let target = format!(
        "{}/images:kt-remote-1",
        registry.reference().replace("/kiln", "")
    );
    let pushed = a.run(&[
        OsStr::new("--json"),
        OsStr::new("push"),
        built.image.as_os_str(),
        OsStr::new(&target),
    ]);
    pushed.assert_code(0);
    let pushed: serde_json::Value = pushed.json();
    let digest = pushed["digest"].as_str().unwrap().to_owned();

    // An independent client reads the artifact.
    let (raw, _) = tool(
        "skopeo",
        &[
            OsStr::new("inspect"),
            OsStr::new("--tls-verify=false"),
            OsStr::new("--raw"),
            OsStr::new(&format!(
                "docker://{}/team/images:kt-remote-1",
                registry.addr
            )),
        ],
        &[],
    );
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["artifactType"], "application/vnd.kiln.image.v1");
    let titles: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .unwrap()
        })
        .collect();
    for file in [
        "kt-remote.qcow2",
        "kt-remote.manifest.json",
        "kt-remote.provenance.intoto.jsonl",
    ] {
        assert!(titles.contains(&file), "{titles:?}");
    }

    // By tag and by digest, into empty folders: the same disk, verified.
    let by_digest = format!(
        "{}/images@{digest}",
        registry.reference().replace("/kiln", "")
    );
    for reference in [&target, &by_digest] {
        let out = temp_dir("kiln-pull-");
        let reader = Kiln::at(&a.store, out.path());
        let run = reader.run(&["pull", reference, "--trusted-key", &keys.path("ci.pub")]);
        run.assert_code(0);
        assert!(
            run.stdout.contains("signature: good, by ci"),
            "{}",
            run.show()
        );
        let disk = out.path().join("kt-remote.qcow2");
        assert_eq!(sha256_of(&disk), built.sha256, "{}", run.show());
        assert!(out.path().join("kt-remote.manifest.json").is_file());
    }

    // A key this reader does not trust: exit 4, nothing written.
    let out = temp_dir("kiln-pull-");
    let reader = Kiln::at(&a.store, out.path());
    let run = reader.run(&["pull", &target, "--trusted-key", &keys.path("other.pub")]);
    run.assert_code(4);
    assert!(
        run.stderr.contains("not signed by a trusted key"),
        "{}",
        run.show()
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "{}",
        run.show()
    );

    // The disk changed in the registry's storage: exit 4, nothing written.
    let disk_digest = manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = registry.blob_path(disk_digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let run = reader.run(&["pull", &target, "--trusted-key", &keys.path("ci.pub")]);
    run.assert_code(4);
    assert!(run.stderr.contains("has the digest"), "{}", run.show());
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "{}",
        run.show()
    );
}

fn sha256_of(path: &Path) -> String {
    let (out, _) = tool("sha256sum", &[path.as_os_str()], &[]);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn a_pull_killed_midway_leaves_no_entry_and_the_next_run_pulls() {
    require_build();
    let registry = Registry::start(&[]);
    let a = Kiln::shared();
    let keys = Keys::new(&a);
    let d = RecipeDir::new();
    let recipe = write_recipe(&d, &a);
    let remote = registry.reference();
    a.build(
        &recipe,
        &[
            "--remote",
            &remote,
            "--push",
            "--signing-key",
            &keys.path("ci.key"),
        ],
    );
    let base = a.plan(&recipe).step("base").key.clone();

    let store = temp_dir("kiln-remote-store-");
    let out = temp_dir("kiln-remote-out-");
    let trusted = ["--remote", &remote, "--trusted-key", &keys.path("ci.pub")];
    let mut child = Command::new(Kiln::binary())
        .args(["--cache", store.path().to_str().unwrap()])
        .args(["--out", out.path().to_str().unwrap()])
        .args(["build", recipe.to_str().unwrap(), "--no-smoke"])
        .args(trusted)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting kiln");
    // The base's blob is being unpacked into a staging dir: kill -9 there.
    let started = Instant::now();
    let unpacking = || {
        std::fs::read_dir(store.path().join("tmp"))
            .map(|dir| dir.flatten().any(|e| e.path().join("tree").is_dir()))
            .unwrap_or(false)
    };
    while !unpacking() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "kiln finished before its pull could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no pull started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !store.path().join("layers-v1").join(&base).exists(),
        "a killed pull published the base"
    );

    // The next run removes the debris and pulls everything.
    let kiln = Kiln::at(store.path(), out.path());
    let report = kiln.build(&recipe, &trusted);
    assert_eq!(report.row("base").status, "pulled", "{:#?}", report.rows);
    cache_verify_clean(&kiln);
}

#[test]
fn quick_bad_remote_arguments_exit_2_with_the_fix() {
    let dir = temp_dir("kiln-remote-args-");
    let kiln = Kiln::with_store(&dir.path().join("store"));
    let keys = Keys::new(&kiln);
    let key = keys.path("ci.key");
    let recipe = "recipes/golden.toml";
    let by_digest = format!("oci://127.0.0.1:1/images@sha256:{}", "a".repeat(64));
    for (args, says) in [
        (
            vec!["build", recipe, "--push", "--signing-key", &key],
            "--push needs a remote cache",
        ),
        (
            vec![
                "build",
                recipe,
                "--remote",
                "oci://127.0.0.1:1/kiln",
                "--push",
            ],
            "no signing key was given",
        ),
        (
            vec!["build", recipe, "--remote", "http://127.0.0.1:1/kiln"],
            "oci+http://",
        ),
        (
            vec!["plan", recipe, "--remote", "oci://127.0.0.1:1/Kiln"],
            "not a repository name",
        ),
        (
            vec!["pull", "oci://127.0.0.1:1/images:web"],
            "no trusted key was given",
        ),
        (
            vec!["push", "out/web.qcow2", &by_digest],
            "names a tag, not a digest",
        ),
    ] {
        let env = [
            ("KILN_SIGNING_KEY", ""),
            ("KILN_REMOTE", ""),
            ("KILN_TRUSTED_KEY", ""),
        ];
        let run = kiln.run_in(&args, &env, None);
        run.assert_code(2);
        assert!(
            run.stderr.contains(says) && run.stderr.contains("fix: "),
            "{}",
            run.show()
        );
    }
}

/// `kiln build A B --push` pushes each entry of the two recipes once, the
/// layer they share included; a reader that builds both from the registry
/// pulls that layer once (the other recipe's row says whose pull it was)
/// and builds nothing.
#[test]
fn several_recipes_push_a_shared_layer_once_and_a_reader_pulls_it_once() {
    require_build();
    let registry = Registry::start(&[]);
    let a = Kiln::shared();
    let keys = Keys::new(&a);
    let d = RecipeDir::new();
    d.write("files/hello.txt", format!("shared {}\n", nonce()));
    let one = d.write_recipe("one.toml", recipe("kt-remote-one", LAYERS), &a);
    let two = d.write(
        "two.toml",
        "extends = \"one.toml\"\n\n[image]\nname = \"kt-remote-two\"\nhostname = \"kt-remote-two\"\n\n\
         [[layer]]\nname = \"two\"\nrun = [\"echo two > /opt/kiln-remote/two\"]\n",
    );
    let (plan_one, plan_two) = (a.plan(&one), a.plan(&two));
    let mut cleanup = ForgetOnDrop::new(&a.store);
    for plan in [&plan_one, &plan_two] {
        let new: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| s.stage.as_str())
            .filter(|s| *s != "base")
            .collect();
        cleanup.add(plan, &new);
    }
    let remote = registry.reference();

    // The builder: every key of the union once, shared ones too.
    let mut args = vec![
        "--json",
        "build",
        "--no-smoke",
        "--remote",
        &remote,
        "--push",
    ];
    let key_path = keys.path("ci.key");
    args.extend(["--signing-key", &key_path]);
    args.extend([one.to_str().unwrap(), two.to_str().unwrap()]);
    let built = a.run(&args);
    built.assert_code(0);
    let mut union: Vec<String> = plan_one
        .steps
        .iter()
        .chain(&plan_two.steps)
        .map(|s| s.key[..12].to_owned())
        .collect();
    union.sort();
    union.dedup();
    for key in &union {
        let pushes = built
            .stderr
            .lines()
            .filter(|l| l.starts_with("pushed ") && l.contains(&format!("({key})")))
            .count();
        assert_eq!(pushes, 1, "{key} pushed {pushes} times:\n{}", built.show());
    }
    let shared_key = plan_one.step("tools/files").key[..12].to_owned();
    assert!(
        plan_two
            .steps
            .iter()
            .any(|s| s.key.starts_with(&shared_key)),
        "two extends one, so shares its tools layer"
    );

    // The reader: its store has only the base; both recipes come from the
    // registry, the shared layer in one pull.
    let store_b = seeded_store(&a, &plan_one);
    let b = Kiln::with_store(store_b.path());
    let trust = keys.path("ci.pub");
    let read = b.run(&[
        "--json",
        "build",
        "--no-smoke",
        "--remote",
        &remote,
        "--trusted-key",
        &trust,
        one.to_str().unwrap(),
        two.to_str().unwrap(),
    ]);
    read.assert_code(0);
    let report: serde_json::Value = read.json();
    let steps = report["steps"].as_array().unwrap();
    for row in steps {
        assert_ne!(row["status"], "built", "{report:#}");
    }
    let shared = steps
        .iter()
        .find(|r| r["key"] == shared_key.as_str())
        .unwrap_or_else(|| panic!("no row for tools/files: {report:#}"));
    assert_eq!(
        (&shared["status"], &shared["shared"]),
        (&serde_json::json!("pulled"), &serde_json::json!(true)),
        "{shared:#}"
    );
    let pulls: usize = report["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["summary"]["rows"].as_array().unwrap())
        .filter(|row| row["key"] == shared_key.as_str() && row["status"] == "pulled")
        .count();
    assert_eq!(pulls, 1, "tools/files pulled once: {report:#}");
    let built_report: serde_json::Value = built.json();
    for (x, y) in built_report["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .zip(report["recipes"].as_array().unwrap())
    {
        assert_eq!(x["summary"]["sha256"], y["summary"]["sha256"], "{y:#}");
    }
    cache_verify_clean(&b);
}
