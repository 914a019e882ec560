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
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// A TCP proxy of the test's own on a free loopback port, in front of the
/// registry, with knobs for the faults a network has: a registry that
/// accepts and never answers, a slow link, a link that is cut. Plain std
/// threads; every one is stopped and joined on drop (also on a panic).
struct Proxy {
    addr: String,
    knobs: Arc<Knobs>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Knobs {
    stop: AtomicBool,
    /// Accept connections and never send a byte, nor forward one.
    stall: AtomicBool,
    /// Bytes per second from the registry to kiln; 0 is no limit.
    throttle: AtomicU64,
    /// Every connection forwarding a byte so far.
    connections: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// How often a proxy thread looks at its knobs.
const PROXY_POLL: Duration = Duration::from_millis(20);

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let addr = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let knobs = Arc::new(Knobs::default());
        let upstream = upstream.to_owned();
        let k = knobs.clone();
        let accept = std::thread::spawn(move || {
            while !k.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (k2, up) = (k.clone(), upstream.clone());
                        let handle = std::thread::spawn(move || forward(client, &up, &k2));
                        k.connections.lock().unwrap().push(handle);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(PROXY_POLL)
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            }
        });
        Proxy {
            addr,
            knobs,
            accept: Some(accept),
        }
    }

    fn reference(&self, repo: &str) -> String {
        format!("oci+http://{}/{repo}", self.addr)
    }

    fn stall(&self, on: bool) {
        self.knobs.stall.store(on, Ordering::SeqCst);
    }

    /// How many connections kiln has opened through it so far.
    fn connections(&self) -> usize {
        self.knobs.connections.lock().unwrap().len()
    }

    fn throttle(&self, bytes_per_second: u64) {
        self.knobs
            .throttle
            .store(bytes_per_second, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.knobs.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            // A panic there is the test's failure already being reported.
            drop(accept.join());
        }
        for handle in self.knobs.connections.lock().unwrap().drain(..) {
            drop(handle.join());
        }
    }
}

/// One connection: kiln's bytes to the registry as they come, the
/// registry's back at the throttle's pace; both closed when either side
/// closes or the proxy stops.
fn forward(client: TcpStream, upstream: &str, knobs: &Knobs) {
    let stopped = || knobs.stop.load(Ordering::SeqCst);
    while knobs.stall.load(Ordering::SeqCst) {
        if stopped() {
            return;
        }
        std::thread::sleep(PROXY_POLL);
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        return; // the registry is stopped: kiln sees the connection close
    };
    for s in [&client, &server] {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(PROXY_POLL)).unwrap();
    }
    let pipe = |mut from: &TcpStream, mut to: &TcpStream, throttled: bool| {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if stopped() {
                break;
            }
            let rate = knobs.throttle.load(Ordering::SeqCst);
            // At most a twentieth of a second's worth at a time.
            let want = if throttled && rate > 0 {
                (rate as usize / 20).clamp(1, buf.len())
            } else {
                buf.len()
            };
            match from.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if throttled && rate > 0 {
                        std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        // Either side gone: close both, so the other direction ends too.
        for s in [from, to] {
            drop(s.shutdown(std::net::Shutdown::Both));
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(|| pipe(&client, &server, false));
        pipe(&server, &client, true);
    });
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

/// A kiln run in the background while the test breaks something;
/// killed (SIGKILL) and reaped if the test ends first.
struct Background {
    args: Vec<String>,
    /// Where its staging dirs are: the store's tmp/ and --out.
    claims: [PathBuf; 2],
    child: Child,
    output: tempfile::TempDir,
    started: Instant,
}

impl Background {
    fn start(kiln: &Kiln, args: &[&str], env: &[(&str, &str)]) -> Background {
        let output = temp_dir("kiln-remote-output-");
        let mut full: Vec<String> = vec![
            "--cache".into(),
            kiln.store.display().to_string(),
            "--out".into(),
            kiln.out.display().to_string(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        let file = |name: &str| std::fs::File::create(output.path().join(name)).unwrap();
        let child = Command::new(Kiln::binary())
            .args(&full)
            .envs(env.iter().copied())
            .env_remove("KILN_CACHE_DIR")
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .spawn()
            .expect("starting kiln");
        Background {
            args: full,
            claims: [kiln.store.join("tmp"), kiln.out.clone()],
            child,
            output,
            started: Instant::now(),
        }
    }

    /// Wait (polling) until `ready` holds; the run must still be going.
    #[track_caller]
    fn wait_for(&mut self, what: &str, ready: impl Fn() -> bool) {
        while !ready() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "kiln ended ({status}) before {what}:\n{}",
                    self.finish().show()
                );
            }
            assert!(
                self.started.elapsed() < Duration::from_secs(300),
                "no {what} within 300 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `kill -9`, then reap it, and wait for the kernel to end the rest
    /// of it: kiln works as pid 1 of a pid namespace, which dies of its
    /// parent's death a moment later and only then drops its claims on
    /// its staging dirs.
    fn kill(&mut self) {
        self.child.kill().expect("killing kiln");
        self.child.wait().expect("reaping kiln");
        let started = Instant::now();
        while self.claims.iter().any(|dir| claimed(dir)) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the killed kiln's staging dirs stay claimed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its end, as a [`Run`].
    fn finish(&mut self) -> Run {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > KILN_TIMEOUT {
                self.kill();
                panic!(
                    "kiln {} took more than {KILN_TIMEOUT:?}",
                    self.args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let read = |name: &str| {
            String::from_utf8_lossy(&std::fs::read(self.output.path().join(name)).unwrap())
                .into_owned()
        };
        Run {
            args: self.args.clone(),
            code: status.code(),
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Whether a process holds the flock of a staging dir's claim in `dir`.
fn claimed(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::File::open(e.path().join(".kiln-pid")).is_ok_and(|f| {
            // SAFETY: flock on a file we hold open; released when it closes.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
        })
    })
}

/// What the store's staging area holds.
fn tmp_entries(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a dir holds an entry whose name starts with `prefix` and that
/// holds a file `name` with some bytes in it: a pull streaming a blob.
fn streaming(dir: &Path, prefix: &str, name: Option<&str>) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with(prefix)
            && std::fs::read_dir(e.path()).is_ok_and(|files| {
                files.flatten().any(|f| {
                    name.is_none_or(|n| f.file_name() == n)
                        && f.metadata().is_ok_and(|m| m.is_file() && m.len() > 0)
                        && f.file_name() != ".kiln-pid"
                })
            })
    })
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
    let original = std::fs::read(&changed).unwrap();
    let mut bytes = original.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&changed, &bytes).unwrap();
    let removed = registry.layer_blob(&key_of("tools/run"));
    let kept = std::fs::read(&removed).unwrap();
    std::fs::remove_file(&removed).unwrap();
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

    // Both blobs as they were, for what follows.
    std::fs::write(&changed, &original).unwrap();
    std::fs::write(&removed, &kept).unwrap();

    // A registry that accepts connections and never answers (a proxy that
    // stalls): one warning after the timeout (shortened here), and the
    // build goes on locally.
    let proxy = Proxy::start(&registry.addr);
    let through = proxy.reference(REPO);
    let trusted = ["--remote", &through, "--trusted-key", &keys.path("ci.pub")];
    let build_args = [
        &["--json", "build", recipe.to_str().unwrap(), "--no-smoke"][..],
        &trusted,
    ]
    .concat();
    proxy.stall(true);
    let store = seeded_store(&a, &plan);
    let kiln = Kiln::with_store(store.path());
    let run = kiln.run_in(&build_args, &[("KILN_REGISTRY_TIMEOUT", "3")], None);
    run.assert_code(0);
    let said = warnings(&run);
    assert_eq!(said.len(), 1, "{}", run.show());
    assert!(
        said[0].contains("is unavailable")
            && said[0].contains("no answer within the timeout")
            && said[0].contains("building locally"),
        "{}",
        said[0]
    );
    let report: BuildReport = run.json();
    assert!(
        report.rows[1..].iter().all(|r| r.status == "built"),
        "{:#?}",
        report.rows
    );
    cache_verify_clean(&kiln);

    // Ctrl-C while a lookup waits on the stalled registry: kiln stops when
    // the read gives up, exit 130, and warns of nothing (neither the
    // registry nor its entry is what failed).
    let store = seeded_store(&a, &plan);
    let kiln = Kiln::with_store(store.path());
    let asked = proxy.connections();
    let mut stopped = Background::start(&kiln, &build_args, &[("KILN_REGISTRY_TIMEOUT", "3")]);
    stopped.wait_for("a lookup waiting on the stalled registry", || {
        proxy.connections() > asked
    });
    // SAFETY: a signal to the kiln this test started (not yet reaped).
    assert_eq!(
        unsafe { libc::kill(stopped.child.id() as i32, libc::SIGINT) },
        0
    );
    let run = stopped.finish();
    run.assert_code(130);
    assert_eq!(warnings(&run), Vec::<String>::new(), "{}", run.show());

    // The registry stopped while a build pulls from it (over a slow link,
    // so that the stop lands after the first pull and before the next):
    // what was pulled stays, the rest is built locally, one warning.
    proxy.stall(false);
    proxy.throttle(1 << 10);
    let store = seeded_store(&a, &plan);
    let kiln = Kiln::with_store(store.path());
    let mut build = Background::start(&kiln, &build_args, &[]);
    let first = store.path().join("layers-v1").join(key_of("tools/files"));
    build.wait_for("tools/files was pulled", || first.exists());
    registry.stop();
    let run = build.finish();
    run.assert_code(0);
    let report: BuildReport = run.json();
    assert_eq!(
        report.statuses(),
        [
            ("base", "cached"),
            ("tools/files", "pulled"),
            ("tools/run", "built"),
            ("image", "built")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned())),
        "{}",
        run.show()
    );
    let said = warnings(&run);
    assert_eq!(said.len(), 1, "{}", run.show());
    assert!(
        said[0].contains("is unavailable") && said[0].contains("building locally"),
        "{}",
        said[0]
    );
    assert_eq!(tmp_entries(store.path()), Vec::<String>::new());
    cache_verify_clean(&kiln);
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
    let disk_ref = format!(
        "{}/kt-remote-disk:1",
        registry.reference().replace("/kiln", "")
    );
    let pushed = a.run(&[
        OsStr::new("--json"),
        OsStr::new("push"),
        built.image.as_os_str(),
        OsStr::new(&target),
        OsStr::new("--containerdisk"),
        OsStr::new(&disk_ref),
        OsStr::new("--signing-key"),
        OsStr::new(&keys.path("ci.key")),
    ]);
    pushed.assert_code(0);
    let pushed: serde_json::Value = pushed.json();
    let digest = pushed["digest"].as_str().unwrap().to_owned();
    let disk_digest = pushed["containerdisk"]["digest"].as_str().unwrap();
    check_containerdisk(
        &format!("docker://{}/team/kt-remote-disk:1", registry.addr),
        disk_digest,
        "kt-remote",
        &built.sha256,
    );
    // The containerDisk alone, again: the same bytes, the same digest.
    let again = a.run(&[
        OsStr::new("--json"),
        OsStr::new("push"),
        built.image.as_os_str(),
        OsStr::new("--containerdisk"),
        OsStr::new(&disk_ref),
    ]);
    again.assert_code(0);
    let again: serde_json::Value = again.json();
    assert_eq!(again["containerdisk"]["digest"], disk_digest, "{again:#}");
    assert!(again.get("digest").is_none(), "{again:#}");
    // A signing key with the containerDisk alone signs nothing: refused
    // before anything is sent.
    let unsigned = a.run(&[
        OsStr::new("push"),
        built.image.as_os_str(),
        OsStr::new("--containerdisk"),
        OsStr::new(&format!("{disk_ref}-signed")),
        OsStr::new("--signing-key"),
        OsStr::new(&keys.path("ci.key")),
    ]);
    unsigned.assert_code(2);
    assert!(
        unsigned
            .stderr
            .contains("a containerDisk carries no kiln signature")
            && unsigned.stderr.contains("leave out --signing-key"),
        "{}",
        unsigned.show()
    );

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
            run.stdout
                .contains("signature: good, by ci; file list signed by ci"),
            "{}",
            run.show()
        );
        let disk = out.path().join("kt-remote.qcow2");
        assert_eq!(sha256_of(&disk), built.sha256, "{}", run.show());
        assert!(out.path().join("kt-remote.manifest.json").is_file());
        assert_eq!(
            std::fs::read(out.path().join("kt-remote.spdx.json")).unwrap(),
            std::fs::read(a.out.join("kt-remote.spdx.json")).unwrap()
        );
    }

    // The SBOM is not a subject of the provenance: without a trusted
    // signature on the file list it is not written. Pushed without a key,
    // and the signed manifest rewritten by the registry (the SBOM's layer
    // pointing at another blob, the manifest.json's, a blob it holds).
    let unsigned = format!(
        "{}:kt-remote-unsigned",
        registry.reference().replace("/kiln", "/images")
    );
    a.run_in(
        &[
            OsStr::new("push"),
            built.image.as_os_str(),
            OsStr::new(&unsigned),
        ],
        &[("KILN_SIGNING_KEY", "")],
        None,
    )
    .assert_code(0);
    let mut swapped = manifest.clone();
    let layers = swapped["layers"].as_array_mut().unwrap();
    let title = |l: &serde_json::Value| l["annotations"]["org.opencontainers.image.title"].clone();
    let other = layers
        .iter()
        .find(|l| title(l) == "kt-remote.manifest.json")
        .unwrap()
        .clone();
    let sbom = layers
        .iter_mut()
        .find(|l| title(l) == "kt-remote.spdx.json")
        .unwrap();
    sbom["digest"] = other["digest"].clone();
    sbom["size"] = other["size"].clone();
    put_manifest(
        &registry.addr,
        "team/images",
        "kt-remote-swapped",
        &serde_json::to_vec(&swapped).unwrap(),
    );
    for (tag, why) in [
        ("kt-remote-unsigned", "pushed without --signing-key"),
        ("kt-remote-swapped", "(key `ci`) does not verify"),
    ] {
        let out = temp_dir("kiln-pull-");
        let reader = Kiln::at(&a.store, out.path());
        let reference = format!("{}:{tag}", registry.reference().replace("/kiln", "/images"));
        let run = reader.run(&["pull", &reference, "--trusted-key", &keys.path("ci.pub")]);
        run.assert_code(0);
        assert!(
            run.stderr
                .contains("note: not written: kt-remote.spdx.json")
                && run.stderr.contains(why),
            "{}",
            run.show()
        );
        assert!(!out.path().join("kt-remote.spdx.json").exists());
        assert_eq!(sha256_of(&out.path().join("kt-remote.qcow2")), built.sha256);
    }

    // kill -9 while `kiln pull` streams the disk in (over a slow link): its
    // staging dir stays in --out until the next pull, which removes it.
    let proxy = Proxy::start(&registry.addr);
    proxy.throttle(256 << 10);
    let slow = format!("{}:kt-remote-1", proxy.reference("team/images"));
    let out = temp_dir("kiln-pull-");
    let reader = Kiln::at(&a.store, out.path());
    let pull = ["pull", &slow, "--trusted-key", &keys.path("ci.pub")];
    let mut killed = Background::start(&reader, &pull, &[]);
    killed.wait_for("the disk streaming in", || {
        streaming(out.path(), ".kiln-pull-", None)
    });
    killed.kill();
    let staged = || {
        std::fs::read_dir(out.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".kiln-pull-"))
            .count()
    };
    assert_eq!(staged(), 1, "the killed pull left no staging dir");
    proxy.throttle(0);
    let run = reader.run(&pull);
    run.assert_code(0);
    assert_eq!(staged(), 0, "{}", run.show());

    // Ctrl-C while it streams: kiln stops within a read, exits 130 and
    // removes its staging dir itself.
    proxy.throttle(256 << 10);
    let mut stopped = Background::start(&reader, &pull, &[]);
    stopped.wait_for("the disk streaming in", || {
        streaming(out.path(), ".kiln-pull-", None)
    });
    // SAFETY: a signal to the kiln this test started (not yet reaped).
    assert_eq!(
        unsafe { libc::kill(stopped.child.id() as i32, libc::SIGINT) },
        0
    );
    let run = stopped.finish();
    run.assert_code(130);
    assert_eq!(staged(), 0, "{}", run.show());
    proxy.throttle(0);
    assert_eq!(sha256_of(&out.path().join("kt-remote.qcow2")), built.sha256);

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

/// PUT a manifest straight into the registry under `tag`, as a registry
/// that rewrites what it serves would.
fn put_manifest(addr: &str, repo: &str, tag: &str, body: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /v2/{repo}/manifests/{tag} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}

/// Read a pushed containerDisk with skopeo, as KubeVirt's CDI or any
/// container tool would: an ordinary OCI image (image manifest, image
/// config, one gzip layer) whose layer holds disk/NAME.qcow2, 107:107,
/// 0440, with the built disk's bytes.
fn check_containerdisk(source: &str, digest: &str, name: &str, sha256: &str) {
    use sha2::Digest;
    let inspect = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["inspect", "--tls-verify=false"];
        args.extend(extra);
        args.push(source);
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let (out, _) = tool("skopeo", &args, &[]);
        serde_json::from_slice(&out).unwrap()
    };
    let manifest = inspect(&["--raw"]);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(manifest.get("artifactType").is_none(), "{manifest:#}");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest:#}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let config = inspect(&["--config", "--raw"]);
    assert_eq!(
        (&config["os"], &config["architecture"]),
        (&"linux".into(), &"amd64".into())
    );
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    let described = inspect(&[]);
    assert_eq!(described["Digest"], digest, "{described:#}");

    // Copied out by skopeo into an OCI layout: the layer's tar.
    let layout = temp_dir("kiln-containerdisk-");
    let dest = format!("oci:{}:disk", layout.path().display());
    let args = ["copy", "--src-tls-verify=false", source, &dest];
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    tool("skopeo", &args, &[]);
    let blob = |digest: &str| {
        layout
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let layer = std::fs::File::open(blob(layers[0]["digest"].as_str().unwrap())).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    let mut seen = Vec::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let h = entry.header().clone();
        let owner = (h.uid().unwrap(), h.gid().unwrap(), h.mode().unwrap());
        if path == format!("disk/{name}.qcow2") {
            assert_eq!(owner, (107, 107, 0o440), "{path}");
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let got: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                got, sha256,
                "the containerDisk's qcow2 is not the built disk"
            );
        } else {
            assert_eq!(path, "disk/", "an entry besides disk/ and the qcow2");
            assert_eq!(owner.0, 107);
        }
        seen.push(path);
    }
    assert_eq!(seen, ["disk/".to_owned(), format!("disk/{name}.qcow2")]);
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
    a.build(
        &recipe,
        &[
            "--remote",
            &registry.reference(),
            "--push",
            "--signing-key",
            &keys.path("ci.key"),
        ],
    );
    let base = a.plan(&recipe).step("base").key.clone();

    let proxy = Proxy::start(&registry.addr);
    let remote = proxy.reference(REPO);
    let store = temp_dir("kiln-remote-store-");
    let out = temp_dir("kiln-remote-out-");
    let kiln = Kiln::at(store.path(), out.path());
    let trusted = ["--remote", &remote, "--trusted-key", &keys.path("ci.pub")];
    let args = [
        &["build", recipe.to_str().unwrap(), "--no-smoke"][..],
        &trusted,
    ]
    .concat();
    let tmp = store.path().join("tmp");
    let published = || store.path().join("layers-v1").join(&base).exists();

    // kill -9 while the base's blob streams in over a slow link.
    proxy.throttle(256 << 10);
    let mut build = Background::start(&kiln, &args, &[]);
    build.wait_for("the base's blob streaming in", || {
        streaming(&tmp, "stage-", Some("entry.tar.zst"))
    });
    build.kill();
    assert!(!published(), "a killed pull published the base");

    // kill -9 while it is unpacked into a staging dir.
    proxy.throttle(0);
    let mut build = Background::start(&kiln, &args, &[]);
    let unpacking = || {
        std::fs::read_dir(&tmp)
            .map(|dir| dir.flatten().any(|e| e.path().join("tree").is_dir()))
            .unwrap_or(false)
    };
    build.wait_for("the base being unpacked", unpacking);
    build.kill();
    assert!(!published(), "a killed pull published the base");
    assert!(
        !tmp_entries(store.path()).is_empty(),
        "the killed runs left no staging dir: the test did not kill them mid-pull"
    );

    // The next run removes the debris and pulls everything.
    let report = kiln.build(&recipe, &trusted);
    assert_eq!(report.row("base").status, "pulled", "{:#?}", report.rows);
    assert_eq!(tmp_entries(store.path()), Vec::<String>::new());
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
