//! Real smoke boots under QEMU (TCG here), of images that `kiln build`
//! makes from the shipped recipes into the shared test store. They fail,
//! never skip, when root, the build tools or QEMU are missing.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// One VM at a time: the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Built once per test run, in `<shared store>.smoke-test/` (emptied by
/// the next run): a copy of `recipes/` (so locks are written there, not in
/// the checkout), its out dir, web built without smoke, and a copy of web
/// whose ESP lost its UKI.
struct Images {
    recipes: PathBuf,
    out: PathBuf,
    web: PathBuf,
    bad: PathBuf,
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        common::require_build();
        common::require_tools(&[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("mdel", "mtools"),
        ]);
        let dir = common::once_per_run_dir("smoke-test");
        let recipes = dir.join("recipes");
        common::copy_recipes(&recipes);
        let out = dir.join("out");
        let run = common::kiln_output(
            &out,
            &[
                "build",
                "--no-smoke",
                recipes.join("web.toml").to_str().unwrap(),
            ],
        );
        assert_eq!(
            run.status.code(),
            Some(0),
            "building web: {}",
            common::describe(&run)
        );
        let web = out.join("web.qcow2");
        let bad = out.join("noboot.qcow2");
        empty_esp(&web, &bad, &dir);
        Images {
            recipes,
            out,
            web,
            bad,
        }
    })
}

/// A copy of `image` whose ESP no longer holds EFI/BOOT/BOOTX64.EFI.
fn empty_esp(image: &Path, bad: &Path, scratch: &Path) {
    let raw = scratch.join("noboot.raw");
    let run = |program: &str, args: &[&std::ffi::OsStr]| {
        let out = Command::new(program)
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program}: {}",
            common::describe(&out)
        );
        out
    };
    use std::ffi::OsStr;
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    );
    let table = run("sfdisk", &[OsStr::new("--json"), raw.as_os_str()]);
    let table: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
    let start = table["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap();
    let target = format!("{}@@{}", raw.display(), start * 512);
    run(
        "mdel",
        &[
            OsStr::new("-i"),
            OsStr::new(&target),
            OsStr::new("::/EFI/BOOT/BOOTX64.EFI"),
        ],
    );
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("qcow2"),
            raw.as_os_str(),
            bad.as_os_str(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
}

/// A private TMPDIR and store folder for one run, so leftovers can be seen.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        Sandbox { dir }
    }
    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }
    fn log(&self) -> PathBuf {
        self.dir.path().join("out/test.smoke.log")
    }
    fn command(&self, image: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--cache")
            .arg(common::shared_store())
            .arg("smoke")
            .arg(image)
            .arg("--log")
            .arg(self.log())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(extra)
            .env("TMPDIR", self.tmp())
            .stdin(Stdio::null());
        c
    }
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.tmp())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "temp files left behind: {left:?}");
        let needle = self.tmp().to_string_lossy().into_owned();
        let qemus = processes_mentioning(&needle);
        assert!(qemus.is_empty(), "QEMU processes left running: {qemus:?}");
        assert!(self.log().is_file(), "the smoke log was not written");
    }
}

/// Pids whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

fn sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The smoke record beside `image`, parsed.
fn record_of(image: &Path) -> serde_json::Value {
    let path = image.with_extension("smoke.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading the smoke record {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The names in a record's `passedTests` or `failedTests`.
fn tests_named(record: &serde_json::Value, list: &str) -> Vec<String> {
    record["predicate"][list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {record:#}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

/// A record for `image` that says `result`, whose subject is that disk.
#[track_caller]
fn assert_record(image: &Path, result: &str) -> serde_json::Value {
    let record = record_of(image);
    assert_eq!(record["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(
        record["predicateType"],
        "https://in-toto.io/attestation/test-result/v0.1"
    );
    assert_eq!(record["predicate"]["result"], result, "{record:#}");
    assert_eq!(
        record["subject"][0]["name"],
        image.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(
        record["subject"][0]["digest"]["sha256"],
        sha256(image),
        "the record is not about this disk"
    );
    let firmware = &record["predicate"]["configuration"][0];
    let path = firmware["uri"]
        .as_str()
        .unwrap()
        .trim_start_matches("file://");
    assert_eq!(firmware["digest"]["sha256"], sha256(Path::new(path)));
    record
}

#[test]
fn a_good_image_passes_its_disk_is_unchanged_and_the_verdict_is_recorded() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().web.clone();
    let expected = common::smoke_checks(&images().recipes.join("web.toml"));
    let before = sha256(&img);
    let sb = Sandbox::new();
    // web's own checks (golden's and nginx's, the page over HTTP) plus two.
    let out = sb
        .command(
            &img,
            &[
                "--json",
                "--check",
                "systemctl is-system-running",
                "--check",
                "test -d /etc",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total = expected.seed.len() + expected.checks.len() + 2 + expected.http;
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["checks_passed"], total, "{report:#}");
    assert_eq!(report["checks_total"], total, "{report:#}");
    assert_eq!(report["checks"].as_array().unwrap().len(), total);
    assert!(report["boot_secs"].as_f64().unwrap() <= report["total_secs"].as_f64().unwrap());
    assert_eq!(sha256(&img), before, "the smoke run changed the disk");
    sb.assert_clean();

    let record = assert_record(&img, "PASSED");
    assert!(tests_named(&record, "failedTests").is_empty(), "{record:#}");
    assert_eq!(tests_named(&record, "passedTests").len(), total + 1);
    let k = &record["predicate"]["kilnSmoke"];
    assert_eq!(k["kilnVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(k["accel"], report["accel"]);
    assert_eq!(k["bootToReadySeconds"], report["boot_secs"]);

    // `kiln inspect` shows the verdict of this very disk…
    let inspect = common::kiln_output(&images().out, &["inspect", img.to_str().unwrap()]);
    assert_eq!(
        inspect.status.code(),
        Some(0),
        "{}",
        common::describe(&inspect)
    );
    let text = String::from_utf8_lossy(&inspect.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("smoke "))
        .unwrap_or_else(|| panic!("no smoke line:\n{text}"));
    assert!(
        line.contains("passed") && line.contains(&format!("{total}/{total} checks")),
        "{line}"
    );
    // …and says a record for another disk does not apply to it.
    let other = tempfile::tempdir().unwrap();
    for name in ["web.manifest.json", "web.smoke.json"] {
        std::fs::copy(images().out.join(name), other.path().join(name)).unwrap();
    }
    std::fs::write(other.path().join("web.qcow2"), b"another disk").unwrap();
    let inspect = common::kiln_output(
        &images().out,
        &["inspect", other.path().join("web.qcow2").to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("does not apply") && !text.contains("smoke       passed"),
        "{}",
        common::describe(&inspect)
    );
}

/// The HTTP path web's nginx does not serve.
const MISSING_PAGE: &str = "/kiln-no-such-page";

#[test]
fn one_boot_reports_every_check_failing_or_not() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().web.clone();
    let recipe = images().recipes.join("web.toml");
    let expected = common::smoke_checks(&recipe);
    let sb = Sandbox::new();
    // A test with extra checks is not the image's verdict in `kiln log`.
    let kept = common::shared_store()
        .join("state-v1/smoke-records/web")
        .join(format!("{}.json", sha256(&img)));
    let kept_before = std::fs::read(&kept).ok();
    let failing = "echo kiln-test-output; exit 7";
    let out = sb
        .command(
            &img,
            &[
                "--json",
                "--accel",
                "tcg",
                "--recipe",
                recipe.to_str().unwrap(),
                "--check",
                failing,
                "--check",
                "true",
                "--http",
                &format!("80:{MISSING_PAGE}:200"),
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", common::describe(&out));
    sb.assert_clean();
    assert_eq!(
        std::fs::read(&kept).ok(),
        kept_before,
        "kiln smoke --check kept its record as the image's verdict"
    );
    // The failing check runs after the recipe's seed and checks; the extra
    // HTTP check after the recipe's.
    let failing_n = expected.seed.len() + expected.checks.len() + 1;
    let guest_total = failing_n + 1;
    let http_n = expected.http + 1;
    let total = guest_total + http_n;

    // --json: every result, each with its own verdict.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], false, "{report:#}");
    assert_eq!(report["checks_total"], total, "{report:#}");
    assert_eq!(report["checks_passed"], total - 2, "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), total, "{report:#}");
    for c in checks {
        let is_failing = (c["kind"] == "guest" && c["index"] == failing_n)
            || (c["kind"] == "http" && c["index"] == http_n);
        assert_eq!(c["passed"], !is_failing, "{c:#}");
    }
    let bad = &checks[failing_n - 1];
    assert_eq!(bad["check"], failing);
    assert_eq!(bad["exit_code"], 7);
    assert_eq!(bad["output"], serde_json::json!(["kiln-test-output"]));
    assert_eq!(checks[guest_total]["kind"], "http");
    assert_eq!(checks[guest_total]["passed"], true, "the recipe's page");
    assert_eq!(checks[total - 1]["check"], format!("GET :80{MISSING_PAGE}"));
    assert!(
        checks[total - 1]["output"][0]
            .as_str()
            .unwrap()
            .contains("got status 404"),
        "{report:#}"
    );

    // The error names each failure, with its output, and the passes.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        format!("2 of {total} checks failed: check {failing_n}, http {http_n}"),
        format!("FAILED check {failing_n} `{failing}` exited 7; its last output:\n      kiln-test-output"),
        format!("FAILED http {http_n} GET :80{MISSING_PAGE}; its last output:"),
        format!("passed check {} `true` exited 0", failing_n + 1),
        "passed check 1 ".to_owned(),
        "passed http 1 GET :80/".to_owned(),
    ] {
        assert!(stderr.contains(&want), "no `{want}` in:\n{stderr}");
    }

    // The record says FAILED, names each failure, and is about this disk.
    let record = assert_record(&img, "FAILED");
    let failed = tests_named(&record, "failedTests");
    assert_eq!(
        failed,
        [
            format!("check {failing_n}: {failing}"),
            format!("http {http_n}: GET :80{MISSING_PAGE}"),
        ],
        "{record:#}"
    );
    let passed = tests_named(&record, "passedTests");
    assert_eq!(passed.len(), total - 2 + 1, "{record:#}");
    assert_eq!(passed[0], "boot");
    let recorded = &record["predicate"]["kilnSmoke"]["checks"];
    assert_eq!(recorded[failing_n - 1]["exitCode"], 7, "{record:#}");
    assert_eq!(recorded[failing_n - 1]["result"], "FAILED");
}

#[test]
fn kiln_smoke_without_a_readable_build_report_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.qcow2");
    std::fs::write(&image, b"not booted: the error comes first").unwrap();
    let report = dir.path().join("x.build.json");
    let cases: [(&str, Option<&str>); 3] = [
        ("has no build report", None),
        ("the build report is damaged", Some("{\"recipe\": ")),
        (
            "which does not exist",
            Some(
                r#"{"recipe": "/nonexistent/web.toml", "image": "x.qcow2", "image_key": "", "sha256": "", "kernel": "", "rows": [], "seconds": 0.0, "smoke": null}"#,
            ),
        ),
    ];
    for (says, content) in cases {
        match content {
            Some(text) => std::fs::write(&report, text).unwrap(),
            // The first case: nothing written yet.
            None => assert!(!report.exists()),
        }
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["--cache", dir.path().join("store").to_str().unwrap()])
            .arg("smoke")
            .arg(&image)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{says}: {}",
            common::describe(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for want in [
            report.display().to_string(),
            says.to_owned(),
            "key `recipe`".to_owned(),
            "fix: pass --recipe".to_owned(),
        ] {
            assert!(stderr.contains(&want), "{says}: no `{want}` in:\n{stderr}");
        }
        assert!(!image.with_extension("smoke.json").exists());
    }
}

#[test]
fn an_unbootable_image_fails_early_with_the_reason() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().bad.clone();
    let sb = Sandbox::new();
    let started = Instant::now();
    let out = sb
        .command(
            &img,
            &[
                "--accel",
                "tcg",
                "--timeout",
                "180",
                "--recipe",
                images().recipes.join("golden.toml").to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", common::describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("found nothing to boot")
            || stderr.contains("could not find the root file system"),
        "{stderr}"
    );
    assert!(!stderr.contains("timed out"), "{stderr}");
    assert!(
        took < Duration::from_secs(90),
        "took {took:?}, not well within the 180 s timeout"
    );
    sb.assert_clean();
}

#[test]
fn sigint_mid_boot_leaves_nothing_behind() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().web.clone();
    let sb = Sandbox::new();
    let mut child = sb
        .command(&img, &["--accel", "tcg"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until QEMU runs (its command line names our TMPDIR), then a bit.
    let needle = sb.tmp().to_string_lossy().into_owned();
    let started = Instant::now();
    while processes_mentioning(&needle)
        .iter()
        .all(|&p| p == child.id())
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "QEMU never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: sending a signal to our own child.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    sb.assert_clean();
}

#[test]
fn build_boots_golden_records_the_pass_and_caches_it() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = images();
    let golden = imgs.recipes.join("golden.toml");
    let disk = imgs.out.join("golden.qcow2");
    let out = common::kiln_output(&imgs.out, &["--json", "build", golden.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let smoke_row = |summary: &serde_json::Value| {
        summary["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["stage"] == "smoke")
            .expect("a smoke row")
            .clone()
    };
    let smoke = smoke_row(&summary);
    assert!(
        smoke["status"] == "passed" || smoke["status"] == "cached",
        "{summary:#}"
    );
    assert_eq!(summary["smoke"]["passed"], true, "{summary:#}");
    assert_eq!(
        summary["smoke"]["checks_passed"], summary["smoke"]["checks_total"],
        "{summary:#}"
    );
    assert!(imgs.out.join("golden.smoke.log").is_file() || smoke["status"] == "cached");
    let record = assert_record(&disk, "PASSED");
    assert_eq!(record["subject"][0]["digest"]["sha256"], summary["sha256"]);
    let first = std::fs::read(disk.with_extension("smoke.json")).unwrap();

    // The same image with the same checks is not booted again, and the
    // record of the pass is written again.
    std::fs::remove_file(disk.with_extension("smoke.json")).unwrap();
    let again = common::kiln_output(&imgs.out, &["--json", "build", golden.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(0), "{}", common::describe(&again));
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(smoke_row(&summary)["status"], "cached", "{summary:#}");
    assert_eq!(
        std::fs::read(disk.with_extension("smoke.json")).unwrap(),
        first,
        "a cached pass re-exports the record of that pass"
    );

    // `kiln log` shows the build's verdict.
    let log = common::kiln_output(&imgs.out, &["log", "golden"]);
    assert_eq!(log.status.code(), Some(0), "{}", common::describe(&log));
    let text = String::from_utf8_lossy(&log.stdout);
    assert!(text.lines().next().unwrap().contains("SMOKE"), "{text}");
    let short = &summary["sha256"].as_str().unwrap()[..12];
    let line = text
        .lines()
        .find(|l| l.contains(short))
        .unwrap_or_else(|| panic!("no build of {short} in:\n{text}"));
    let n = summary["smoke"]["checks_total"].as_u64().unwrap();
    assert!(line.contains(&format!("passed {n}/{n}")), "{line}");
    let log = common::kiln_output(&imgs.out, &["--json", "log", "golden"]);
    let entries: serde_json::Value = serde_json::from_slice(&log.stdout).unwrap();
    let entry = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["image_sha256"] == summary["sha256"])
        .unwrap();
    assert_eq!(entry["smoke"]["state"], "recorded", "{entry:#}");
    assert_eq!(entry["smoke"]["passed"], true, "{entry:#}");
}

#[test]
fn a_failing_recipe_check_makes_build_exit_3_and_reports_every_check() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = images();
    let recipe = imgs.recipes.join("broken-check.toml");
    // golden serves no HTTP: its port 80 check fails too.
    std::fs::write(
        &recipe,
        "extends = \"golden.toml\"\n[image]\nname = \"broken-check\"\n[smoke]\n\
         checks = [\"systemctl is-active no-such-service\"]\n\
         http = [{ port = 80, path = \"/\", status = 200 }]\n",
    )
    .unwrap();
    let expected = common::smoke_checks(&recipe);
    let failing_n = expected.checks.len();
    let out = common::kiln_output(&imgs.out, &["build", recipe.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", common::describe(&out));
    assert!(imgs.out.join("broken-check.smoke.log").is_file());
    let want_failed =
        format!("FAILED check {failing_n} `systemctl is-active no-such-service` exited");
    // The summary on stdout and the error on stderr both list every check.
    for (what, text) in [
        ("summary", String::from_utf8_lossy(&out.stdout)),
        ("error", String::from_utf8_lossy(&out.stderr)),
    ] {
        assert!(
            text.contains(&want_failed),
            "{what}: {}",
            common::describe(&out)
        );
        assert!(
            text.contains("FAILED http 1 GET :80/"),
            "{what}: {}",
            common::describe(&out)
        );
        for n in 1..failing_n {
            assert!(
                text.contains(&format!("passed check {n} ")),
                "{what}: check {n}: {}",
                common::describe(&out)
            );
        }
    }
    let record = assert_record(&imgs.out.join("broken-check.qcow2"), "FAILED");
    assert_eq!(tests_named(&record, "failedTests").len(), 2, "{record:#}");
    let log = common::kiln_output(&imgs.out, &["log", "broken-check"]);
    let text = String::from_utf8_lossy(&log.stdout);
    assert!(
        text.contains(&format!("FAILED {}/{}", failing_n - 1, failing_n + 1)),
        "{text}"
    );
}
