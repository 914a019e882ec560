//! Recipes: load the TOML, follow `extends`, validate, and produce the
//! immutable [`Recipe`] the planner consumes.
//!
//! Every problem is a [`BadInput`] naming the file, the key and the fix.
//! Nothing here touches the store, `out/` or the host beyond reading the
//! recipe files and the files they copy.

mod raw;
pub mod units;

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::error::BadInput;
pub use raw::RawRecipe;
use raw::{RawFile, RawHttp, RawLayer, RawSmoke, RawVolume};

/// Where `kiln build` looks when no recipe is given.
pub const DEFAULT_RECIPE: &str = "recipes/golden.toml";
const DEFAULT_SIZE: &str = "2GiB";
const DEFAULT_CMDLINE: &str = "console=ttyS0";
const DEFAULT_VARIANT: &str = "minbase";
const DEFAULT_SMOKE_TIMEOUT: Duration = Duration::from_secs(180);
/// The smallest root filesystem kiln will make.
const MIN_SIZE: u64 = 64 << 20;
/// The largest: beyond this a typo is more likely than intent.
const MAX_SIZE: u64 = 64 << 40;
const MAX_NAME: usize = 63;
/// A volume's disk carries the virtio serial `vol-NAME`, at most 20 bytes.
const VOLUME_NAME_MAX: usize = 16;
const VARIANTS: &[&str] = &[
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "standard",
];
const REFERENCE: &str = "see \"Recipe reference\" in README.md";

/// A validated recipe, with `extends` already applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The recipe file that was asked for.
    pub path: PathBuf,
    /// Every file read to make this recipe, the asked-for one first.
    pub sources: Vec<PathBuf>,
    pub image: ImageSpec,
    pub base: BaseSpec,
    /// The recipe file that defines `[base]` (its lock pins the base).
    pub base_defined_in: PathBuf,
    pub layers: Vec<LayerSpec>,
    pub volumes: Vec<VolumeSpec>,
    pub smoke: SmokeSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub name: String,
    /// Size of the root filesystem, in bytes.
    pub size: u64,
    /// The disk that is smoked and that the records describe.
    pub format: Format,
    /// The other deployable files wanted in `out/`, in the recipe's order,
    /// without `format` itself (see `export`).
    pub formats: Vec<ExportFormat>,
    pub hostname: String,
    /// Extra kernel arguments; kiln adds `root=LABEL=root ro` itself.
    pub cmdline: String,
    /// A sealed image: the root is read-only under a dm-verity hash tree
    /// (see `assemble::verity`).
    pub verity: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// A deployable file made from the assembled disk (`[image] formats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Qcow2,
    Raw,
    Vmdk,
    Vhd,
    Gce,
    ContainerDisk,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 6] = [
        ExportFormat::Qcow2,
        ExportFormat::Raw,
        ExportFormat::Vmdk,
        ExportFormat::Vhd,
        ExportFormat::Gce,
        ExportFormat::ContainerDisk,
    ];

    /// As written in a recipe.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Qcow2 => "qcow2",
            ExportFormat::Raw => "raw",
            ExportFormat::Vmdk => "vmdk",
            ExportFormat::Vhd => "vhd",
            ExportFormat::Gce => "gce",
            ExportFormat::ContainerDisk => "containerdisk",
        }
    }

    pub fn parse(text: &str) -> Option<ExportFormat> {
        ExportFormat::ALL.into_iter().find(|f| f.name() == text)
    }

    /// The same file as the primary disk of this format, if it is one.
    pub fn is(self, primary: Format) -> bool {
        self.name() == primary.extension()
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BaseSpec {
    pub suite: String,
    pub variant: String,
    pub packages: Vec<String>,
    /// The archive to use; `None` means the host's apt mirror.
    pub mirror: Option<String>,
    /// `initramfs = false`: the kernels this step installs get no initrd
    /// here (a later layer builds it); see [`crate::plan::INITRAMFS_LATER`].
    pub initramfs: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub name: String,
    pub upgrade: bool,
    pub packages: Vec<String>,
    pub files: Vec<FileSpec>,
    pub run: Vec<String>,
    /// `initramfs = false`: the kernels this layer's `upgrade` and
    /// `packages` steps install get no initrd here (a later layer builds
    /// it); see [`crate::plan::INITRAMFS_LATER`].
    pub initramfs: bool,
    /// The recipe file that defines this layer (files are relative to it).
    pub defined_in: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileSpec {
    /// As written in the recipe, for messages and keys (keys must not
    /// depend on where the checkout lives).
    pub src_name: String,
    /// Absolute, canonical path on the host.
    pub src: PathBuf,
    /// Absolute path inside the image, normalised.
    pub dest: String,
    pub mode: u32,
    pub owner: Owner,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeSpec {
    pub name: String,
    pub mount: String,
    pub size: u64,
    pub filesystem: String,
    pub owner: Owner,
}

/// A recipe's `owner = "user:group"`: each part a name or a number, looked
/// up in the image (not on the host) when the file or volume is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub user: String,
    pub group: String,
}

impl Owner {
    pub fn root() -> Owner {
        Owner {
            user: "root".into(),
            group: "root".into(),
        }
    }

    pub fn parse(text: &str) -> Result<Owner, String> {
        let part_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        };
        match text.split_once(':') {
            Some((user, group)) if part_ok(user) && part_ok(group) => Ok(Owner {
                user: user.to_owned(),
                group: group.to_owned(),
            }),
            _ => Err(format!("`{}` is not user:group", truncate(text))),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.user, self.group)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SmokeSpec {
    pub timeout: Duration,
    pub checks: Vec<String>,
    pub http: Vec<HttpCheck>,
    pub seed: Vec<String>,
    /// Log in over SSH as root with a throwaway key passed as the
    /// `ssh.authorized_keys.root` credential, and run `ssh_checks`.
    pub ssh: bool,
    /// Commands run as root over SSH, from the host (with `ssh`).
    pub ssh_checks: Vec<String>,
    /// Seed cloud-init with a NoCloud volume (`cidata`) naming a host and
    /// a user with a throwaway key, and log in as that user.
    pub cloud_init: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HttpCheck {
    pub port: u16,
    pub path: String,
    pub status: u16,
    pub contains: Option<String>,
}

/// Load and validate the recipe at `path`.
pub fn load(path: &Path) -> Result<Recipe> {
    let mut chain = Vec::new();
    let merged = load_chain(path, None, &mut chain)?;
    resolve(path, merged, chain)
}

/// A raw recipe merged with its ancestors, with each layer remembering
/// which file defined it.
struct Merged {
    raw: RawRecipe,
    layer_origins: Vec<PathBuf>,
    /// The file that set `[base]`.
    base_origin: Option<PathBuf>,
}

fn read_raw(path: &Path) -> Result<RawRecipe, BadInput> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        BadInput::new(
            path,
            "(file)",
            format!("cannot read the recipe: {e}"),
            "check the path; recipes are TOML files such as recipes/golden.toml",
        )
    })?;
    parse(path, &text)
}

/// Parse recipe text; `path` is only used in messages.
///
/// Two passes, so that every error names what a reader can act on: the
/// TOML parser's errors are syntax (a line to fix), while serde's errors
/// (wrong type, unknown or missing key) are tracked to the key path where
/// they happened, e.g. `layer[0].packages`, by `serde_path_to_error`.
fn parse(path: &Path, text: &str) -> Result<RawRecipe, BadInput> {
    let document = toml::Deserializer::parse(text).map_err(|e| {
        BadInput::new(
            path,
            "(syntax)",
            at_line(text, &e, e.message().trim()),
            "fix the TOML syntax at that line",
        )
    })?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let at = e.path().to_string();
        shape_error(path, text, &at, e.inner())
    })
}

/// `line N: message`, when the error knows where it is.
pub(crate) fn at_line(text: &str, e: &toml::de::Error, message: &str) -> String {
    match e.span() {
        Some(s) => {
            let line = text[..s.start.min(text.len())].lines().count().max(1);
            format!("line {line}: {message}")
        }
        None => message.to_owned(),
    }
}

/// A well-formed TOML document that does not have a recipe's shape. `at`
/// is the key path serde had reached (`.` for the top level).
fn shape_error(path: &Path, text: &str, at: &str, e: &toml::de::Error) -> BadInput {
    let message = e.message().trim();
    let qualify = |name: &str| {
        if at == "." || at.is_empty() {
            name.to_owned()
        } else {
            format!("{at}.{name}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // The path already ends at the unknown key.
        let name = rest.split('`').next().unwrap_or("?");
        let name = if at.ends_with(name) {
            at.to_owned()
        } else {
            qualify(name)
        };
        return BadInput::new(
            path,
            name,
            at_line(text, e, message),
            format!("remove or rename it; {REFERENCE} for the keys each table takes"),
        );
    }
    if message.starts_with("missing field `") {
        let name = qualify(message.split('`').nth(1).unwrap_or("?"));
        return BadInput::new(
            path,
            name,
            at_line(text, e, message),
            format!("add it; {REFERENCE}"),
        );
    }
    // serde's "invalid type: string \"x\", expected a sequence" (or
    // "invalid value: …"), said in recipe words.
    let leaf = at.rsplit('.').next().unwrap_or(at);
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    if let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|m| m.rsplit_once(", expected "))
    {
        let wanted = plain_type(expected);
        let fix = match (found.strip_prefix("string "), expected) {
            (Some(quoted), "a sequence") => {
                format!("write it as a list: {leaf} = [{quoted}]")
            }
            _ => format!("write {leaf} as {wanted}; {REFERENCE}"),
        };
        return BadInput::new(
            path,
            at,
            at_line(
                text,
                e,
                &format!("is {}, but {leaf} takes {wanted}", plain_value(found)),
            ),
            fix,
        );
    }
    BadInput::new(
        path,
        at,
        at_line(text, e, message),
        format!("correct the value of {leaf}; {REFERENCE}"),
    )
}

/// serde's description of a value it got (`string "x"`, ``integer `2` ``).
fn plain_value(found: &str) -> String {
    let unquoted = |v: &str| v.trim_matches('`').to_owned();
    match found.split_once(' ') {
        Some(("string", v)) => format!("the string {v}"),
        Some(("integer", v)) | Some(("floating", v)) => {
            format!("the number {}", unquoted(v.trim_start_matches("point ")))
        }
        Some(("boolean", v)) => unquoted(v),
        _ if found == "sequence" => "a list".to_owned(),
        _ if found == "map" => "a table".to_owned(),
        _ => found.to_owned(),
    }
}

/// serde's name for an expected type, in the words of the recipe reference.
fn plain_type(expected: &str) -> String {
    match expected {
        "a sequence" => "a list, e.g. [\"a\", \"b\"]".to_owned(),
        "a string" => "a string in double quotes".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "u16" => "a whole number from 0 to 65535".to_owned(),
        e if e.starts_with("struct ") || e == "a map" => "a table".to_owned(),
        e => e.to_owned(),
    }
}

/// The recipe and `extends` value that led to a parent recipe.
struct ExtendedBy<'a> {
    child: &'a Path,
    extends: &'a str,
}

fn load_chain(path: &Path, via: Option<ExtendedBy>, chain: &mut Vec<PathBuf>) -> Result<Merged> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        BadInput::new(
            path,
            "(file)",
            format!("cannot read the recipe: {e}"),
            "check the path",
        )
    })?;
    if chain.contains(&canonical) {
        let cycle: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
        return Err(BadInput::new(
            path,
            "extends",
            format!(
                "recipes extend each other in a cycle: {} -> {}",
                cycle.join(" -> "),
                canonical.display()
            ),
            "break the cycle: a recipe may extend only one that does not extend it back",
        )
        .into());
    }
    chain.push(canonical.clone());
    let raw = read_raw(path).map_err(|bad| match via {
        Some(by) => not_a_parent(by, bad),
        None => bad,
    })?;
    let Some(parent_name) = raw.extends.clone() else {
        let n = raw.layers.len();
        let base_origin = raw.base.as_ref().map(|_| canonical.clone());
        return Ok(Merged {
            raw,
            layer_origins: vec![canonical; n],
            base_origin,
        });
    };
    let dir = canonical.parent().unwrap_or(Path::new("/"));
    let parent_path = dir.join(&parent_name);
    if !parent_path.is_file() {
        return Err(BadInput::new(
            path,
            "extends",
            format!(
                "`{parent_name}` does not exist (looked for {})",
                parent_path.display()
            ),
            "name a recipe file relative to this one, e.g. extends = \"golden.toml\"",
        )
        .into());
    }
    let by = ExtendedBy {
        child: path,
        extends: &parent_name,
    };
    let parent = load_chain(&parent_path, Some(by), chain)?;
    Ok(merge(parent, raw, &canonical))
}

/// A parent that cannot be read as a recipe, reported from the recipe and
/// key that named it: the parent alone may be a file the user never meant
/// to point at (`/etc/passwd`, a Cargo.toml), and its own error would not
/// say how kiln came to read it.
fn not_a_parent(by: ExtendedBy, bad: BadInput) -> BadInput {
    let ExtendedBy { child, extends } = by;
    let key = bad.key.as_deref().unwrap_or("");
    // A file TOML cannot parse, or whose top level has keys no recipe has,
    // is some other kind of file; an error further in is a recipe's mistake.
    let foreign =
        matches!(key, "(syntax)" | "(file)") || (!key.contains('.') && !key.contains('['));
    let what = if foreign {
        "is not a kiln recipe"
    } else {
        "is a recipe with an error"
    };
    let fix = if foreign {
        format!(
            "point extends at a kiln recipe, e.g. extends = \"golden.toml\" (a path relative to {})",
            child.display()
        )
    } else {
        format!("fix the recipe it extends: {}", bad.fix)
    };
    BadInput::new(
        child,
        "extends",
        format!(
            "extends = \"{extends}\": {what}: {bad}",
            bad = one_line(&bad)
        ),
        fix,
    )
}

/// A [`BadInput`] as one line (its file, key and problem, not its fix).
fn one_line(bad: &BadInput) -> String {
    let mut s = String::new();
    if let Some(f) = &bad.file {
        s.push_str(&format!("{}: ", f.display()));
    }
    if let Some(k) = &bad.key {
        s.push_str(&format!("key `{k}`: "));
    }
    s.push_str(&bad.problem);
    s
}

/// Apply a child recipe on top of its parent: image fields override one by
/// one, `[base]` replaces, layers and volumes are appended, smoke checks are
/// appended and the timeout overrides.
fn merge(parent: Merged, child: RawRecipe, child_path: &Path) -> Merged {
    let Merged {
        raw: p,
        mut layer_origins,
        base_origin,
    } = parent;
    let image = match (p.image, child.image) {
        (Some(pi), Some(ci)) => Some(raw::RawImage {
            name: ci.name.or(pi.name),
            size: ci.size.or(pi.size),
            format: ci.format.or(pi.format),
            formats: ci.formats.or(pi.formats),
            hostname: ci.hostname.or(pi.hostname),
            cmdline: ci.cmdline.or(pi.cmdline),
            verity: ci.verity.or(pi.verity),
        }),
        (pi, ci) => ci.or(pi),
    };
    let base_origin = if child.base.is_some() {
        Some(child_path.to_owned())
    } else {
        base_origin
    };
    let mut layers = p.layers;
    layer_origins.extend(std::iter::repeat_n(
        child_path.to_owned(),
        child.layers.len(),
    ));
    layers.extend(child.layers);
    let mut volumes = p.volumes;
    volumes.extend(child.volumes);
    let smoke = match (p.smoke, child.smoke) {
        (Some(ps), Some(cs)) => Some(RawSmoke {
            timeout: cs.timeout.or(ps.timeout),
            checks: ps.checks.into_iter().chain(cs.checks).collect(),
            http: ps.http.into_iter().chain(cs.http).collect(),
            seed: ps.seed.into_iter().chain(cs.seed).collect(),
            ssh: cs.ssh.or(ps.ssh),
            ssh_checks: ps.ssh_checks.into_iter().chain(cs.ssh_checks).collect(),
            cloud_init: cs.cloud_init.or(ps.cloud_init),
        }),
        (ps, cs) => cs.or(ps),
    };
    Merged {
        raw: RawRecipe {
            extends: None,
            image,
            base: child.base.or(p.base),
            layers,
            volumes,
            smoke,
        },
        layer_origins,
        base_origin,
    }
}

fn resolve(path: &Path, merged: Merged, sources: Vec<PathBuf>) -> Result<Recipe> {
    let Merged {
        raw,
        layer_origins,
        base_origin,
    } = merged;
    let bad = |key: &str, problem: String, fix: &str| -> anyhow::Error {
        BadInput::new(path, key, problem, fix).into()
    };

    let raw_image = raw.image.unwrap_or_default();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = raw_image.name.unwrap_or(stem);
    check_name(&name).map_err(|why| {
        bad(
            "image.name",
            why,
            "use 1-63 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
        )
    })?;
    let size_text = raw_image.size.unwrap_or_else(|| DEFAULT_SIZE.to_owned());
    let size = units::parse_size(&size_text).map_err(|why| {
        bad(
            "image.size",
            why,
            "write a size such as \"2GiB\" or \"512MiB\"",
        )
    })?;
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(bad(
            "image.size",
            format!(
                "{size_text} is outside the range kiln supports ({} to {})",
                units::show_size(MIN_SIZE),
                units::show_size(MAX_SIZE)
            ),
            "pick a root filesystem size in that range, e.g. \"2GiB\"",
        ));
    }
    let format = match raw_image.format.as_deref().unwrap_or("qcow2") {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        other => {
            return Err(bad(
                "image.format",
                format!("unknown format `{other}`"),
                "use \"qcow2\" or \"raw\"; other deployable files go in `formats`",
            ))
        }
    };
    let formats = export_formats(path, raw_image.formats.unwrap_or_default(), format)?;
    let hostname = raw_image.hostname.unwrap_or_else(|| name.clone());
    check_hostname(&hostname).map_err(|why| {
        bad(
            "image.hostname",
            why,
            "use letters, digits and '-' in dot-separated labels of at most 63 characters",
        )
    })?;
    let cmdline = raw_image
        .cmdline
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
    if let Some(c) = cmdline.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(bad(
            "image.cmdline",
            format!("contains the character {c:?}"),
            "use printable ASCII on one line",
        ));
    }
    if cmdline.split_whitespace().any(|w| w.starts_with("root=")) {
        return Err(bad(
            "image.cmdline",
            "sets root=, which kiln sets itself (root=LABEL=root)".into(),
            "remove root= from cmdline",
        ));
    }

    let Some(raw_base) = raw.base else {
        return Err(bad(
            "base",
            "the recipe has no [base] table (directly or through extends)".into(),
            "add [base] with at least suite = \"trixie\", or extends = \"golden.toml\"",
        ));
    };
    let base_file = base_origin
        .unwrap_or_else(|| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()));
    let base_bad = |key: &str, problem: String, fix: &str| -> anyhow::Error {
        BadInput::new(&base_file, key, problem, fix).into()
    };
    if raw_base.suite.is_empty()
        || !raw_base
            .suite
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(base_bad(
            "base.suite",
            format!("`{}` is not a suite name", raw_base.suite),
            "use a Debian suite such as \"trixie\"",
        ));
    }
    let variant = raw_base
        .variant
        .unwrap_or_else(|| DEFAULT_VARIANT.to_owned());
    if !VARIANTS.contains(&variant.as_str()) {
        return Err(base_bad(
            "base.variant",
            format!("unknown variant `{variant}`"),
            &format!("use one of {}", VARIANTS.join(", ")),
        ));
    }
    for (i, p) in raw_base.packages.iter().enumerate() {
        check_package(p).map_err(|why| {
            base_bad(
                &format!("base.packages[{i}]"),
                why,
                "use a Debian package name such as \"systemd-sysv\"",
            )
        })?;
    }
    if let Some(m) = &raw_base.mirror {
        let ok = ["http://", "https://", "file:/"]
            .iter()
            .any(|s| m.starts_with(s))
            && !m.chars().any(char::is_whitespace);
        if !ok {
            return Err(base_bad("base.mirror", format!("`{m}` is not an archive URL"), "use an http://, https:// or file:/ URL, or remove mirror to use the host's apt mirror"));
        }
    }
    let base = BaseSpec {
        suite: raw_base.suite,
        variant,
        packages: raw_base.packages,
        mirror: raw_base.mirror,
        initramfs: raw_base.initramfs.unwrap_or(true),
    };

    let mut layers = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, (layer, origin)) in raw.layers.into_iter().zip(layer_origins).enumerate() {
        let spec = resolve_layer(i, layer, &origin)?;
        if !seen.insert(spec.name.clone()) {
            return Err(BadInput::new(&origin, format!("layer[{i}].name"), format!("a layer named `{}` already exists", spec.name), "give every layer a distinct name (an extending recipe cannot reuse its parent's layer names)").into());
        }
        layers.push(spec);
    }

    let mut volumes = Vec::new();
    for (i, v) in raw.volumes.into_iter().enumerate() {
        let vol = resolve_volume(path, i, v)?;
        if volumes
            .iter()
            .any(|o: &VolumeSpec| o.name == vol.name || o.mount == vol.mount)
        {
            return Err(bad(
                &format!("volume[{i}]"),
                format!(
                    "volume `{}` repeats another volume's name or mount point",
                    vol.name
                ),
                "give each volume its own name and mount point",
            ));
        }
        volumes.push(vol);
    }

    let smoke = resolve_smoke(path, raw.smoke.unwrap_or_default())?;
    Ok(Recipe {
        path: path.to_owned(),
        sources,
        image: ImageSpec {
            name,
            size,
            format,
            formats,
            hostname,
            cmdline,
            verity: raw_image.verity.unwrap_or(false),
        },
        base,
        base_defined_in: base_file,
        layers,
        volumes,
        smoke,
    })
}

/// `[image] formats`: each a known format, listed once. The primary
/// `format` may be listed too (Packer users list every file they want); it
/// is made once, as the primary.
fn export_formats(path: &Path, names: Vec<String>, primary: Format) -> Result<Vec<ExportFormat>> {
    let all: Vec<&str> = ExportFormat::ALL.iter().map(|f| f.name()).collect();
    let mut formats = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let key = format!("image.formats[{i}]");
        let Some(format) = ExportFormat::parse(name) else {
            return Err(BadInput::new(
                path,
                key,
                format!("unknown format `{}`", truncate(name)),
                format!("use one of {}", all.join(", ")),
            )
            .into());
        };
        if names[..i].contains(name) {
            return Err(BadInput::new(
                path,
                key,
                format!("`{name}` is listed twice"),
                "list each format once",
            )
            .into());
        }
        if !format.is(primary) {
            formats.push(format);
        }
    }
    Ok(formats)
}

fn resolve_layer(i: usize, layer: RawLayer, origin: &Path) -> Result<LayerSpec> {
    let RawLayer {
        name,
        upgrade,
        packages,
        files,
        run,
        initramfs,
    } = layer;
    let key = |k: &str| format!("layer[{i}].{k}");
    let bad = |k: String, problem: String, fix: &str| -> anyhow::Error {
        BadInput::new(origin, k, problem, fix).into()
    };
    check_name(&name)
        .map_err(|why| bad(key("name"), why, "use 1-63 of a-z, 0-9, '.', '_' and '-'"))?;
    let ctx = format!("layer.{name}");
    if !upgrade && packages.is_empty() && files.is_empty() && run.is_empty() {
        return Err(bad(
            ctx,
            "the layer does nothing".into(),
            "give it upgrade = true, packages, files or run, or remove it",
        ));
    }
    if initramfs == Some(false) && !upgrade && packages.is_empty() {
        return Err(bad(
            format!("{ctx}.initramfs"),
            "is false, but the layer installs no packages (no upgrade, no packages)".into(),
            "remove initramfs = false: it only concerns kernels this layer's packages install",
        ));
    }
    for (j, p) in packages.iter().enumerate() {
        check_package(p).map_err(|why| {
            bad(
                format!("{ctx}.packages[{j}]"),
                why,
                "use a Debian package name such as \"nginx-light\"",
            )
        })?;
    }
    for (j, cmd) in run.iter().enumerate() {
        if cmd.trim().is_empty() {
            return Err(bad(
                format!("{ctx}.run[{j}]"),
                "is empty".into(),
                "remove it or write a shell command",
            ));
        }
    }
    let dir = origin.parent().unwrap_or(Path::new("/"));
    let files = files
        .into_iter()
        .enumerate()
        .map(|(j, f)| resolve_file(origin, dir, &format!("{ctx}.files[{j}]"), f))
        .collect::<Result<Vec<_>>>()?;
    Ok(LayerSpec {
        name,
        upgrade,
        packages,
        files,
        run,
        initramfs: initramfs.unwrap_or(true),
        defined_in: origin.to_owned(),
    })
}

fn resolve_file(origin: &Path, dir: &Path, key: &str, file: RawFile) -> Result<FileSpec> {
    let RawFile {
        src,
        dest,
        mode,
        owner,
    } = file;
    let bad = |k: &str, problem: String, fix: &str| -> anyhow::Error {
        BadInput::new(origin, format!("{key}.{k}"), problem, fix).into()
    };
    if Path::new(&src).is_absolute() {
        return Err(bad(
            "src",
            format!("`{src}` is an absolute path"),
            "write src relative to the recipe's folder, e.g. \"files/index.html\"",
        ));
    }
    let joined = dir.join(&src);
    let canonical = std::fs::canonicalize(&joined).map_err(|e| {
        bad(
            "src",
            format!("`{src}` cannot be read ({}: {e})", joined.display()),
            "create the file or correct the path (it is relative to the recipe's folder)",
        )
    })?;
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    if !canonical.starts_with(&root) {
        return Err(bad("src", format!("`{src}` is outside the recipe's folder {}", root.display()), "move the file under the recipe's folder; kiln only copies files that live beside the recipe"));
    }
    if !canonical.is_file() {
        return Err(bad(
            "src",
            format!("`{src}` is not a regular file"),
            "list each file to copy by itself",
        ));
    }
    let dest = normalize_dest(&dest).map_err(|why| {
        bad(
            "dest",
            why,
            "write an absolute path inside the image without `..`, e.g. \"/etc/motd\"",
        )
    })?;
    let mode_text = mode.unwrap_or_else(|| "0644".to_owned());
    let mode = u32::from_str_radix(&mode_text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            bad(
                "mode",
                format!("`{mode_text}` is not an octal file mode"),
                "write it as a string of octal digits, e.g. \"0644\"",
            )
        })?;
    let owner = parse_owner(owner).map_err(|why| {
        bad(
            "owner",
            why,
            "write \"user:group\" with names or numbers, e.g. \"root:root\" or \"33:33\"",
        )
    })?;
    Ok(FileSpec {
        src_name: src,
        src: canonical,
        dest,
        mode,
        owner,
    })
}

fn resolve_volume(path: &Path, i: usize, v: RawVolume) -> Result<VolumeSpec> {
    let RawVolume {
        name,
        mount,
        size,
        filesystem,
        owner,
    } = v;
    let bad = |k: &str, problem: String, fix: &str| -> anyhow::Error {
        BadInput::new(path, format!("volume[{i}].{k}"), problem, fix).into()
    };
    check_name(&name).map_err(|why| bad("name", why, "use 1-16 of a-z, 0-9, '.', '_' and '-'"))?;
    if name.len() > VOLUME_NAME_MAX {
        return Err(bad("name", format!("`{name}` is longer than {VOLUME_NAME_MAX} characters"), "use a shorter name: the volume's disk is found by the serial `vol-NAME`, which holds 20 characters"));
    }
    let mount = normalize_dest(&mount)
        .map_err(|why| bad("mount", why, "write an absolute path such as \"/srv/data\""))?;
    const SYSTEM: &[&str] = &[
        "/", "/usr", "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev",
        "/run", "/tmp",
    ];
    if SYSTEM.contains(&mount.as_str()) || mount.starts_with("/usr/") {
        return Err(bad(
            "mount",
            format!("`{mount}` is part of the operating system"),
            "mount data volumes somewhere like /srv/NAME or /var/lib/NAME",
        ));
    }
    let size_v = units::parse_size(&size)
        .map_err(|why| bad("size", why, "write a size such as \"1GiB\""))?;
    if size_v < (16 << 20) {
        return Err(bad(
            "size",
            format!("{size} is too small for a filesystem"),
            "use at least 16MiB",
        ));
    }
    let filesystem = filesystem.unwrap_or_else(|| "ext4".to_owned());
    if !["ext4", "xfs", "btrfs"].contains(&filesystem.as_str()) {
        return Err(bad(
            "filesystem",
            format!("unknown filesystem `{filesystem}`"),
            "use ext4, xfs or btrfs",
        ));
    }
    let owner = parse_owner(owner).map_err(|why| {
        bad(
            "owner",
            why,
            "write \"user:group\", e.g. \"postgres:postgres\"",
        )
    })?;
    Ok(VolumeSpec {
        name,
        mount,
        size: size_v,
        filesystem,
        owner,
    })
}

fn resolve_smoke(path: &Path, s: RawSmoke) -> Result<SmokeSpec> {
    let bad = |k: String, problem: String, fix: &str| -> anyhow::Error {
        BadInput::new(path, k, problem, fix).into()
    };
    let timeout = match &s.timeout {
        None => DEFAULT_SMOKE_TIMEOUT,
        Some(t) => units::parse_duration(t).map_err(|why| {
            bad(
                "smoke.timeout".into(),
                why,
                "write a duration such as \"180s\" or \"5m\"",
            )
        })?,
    };
    if timeout.is_zero() {
        return Err(bad(
            "smoke.timeout".into(),
            "is zero".into(),
            "give the boot time to happen, e.g. \"180s\"",
        ));
    }
    for (key, list) in [
        ("checks", &s.checks),
        ("seed", &s.seed),
        ("ssh_checks", &s.ssh_checks),
    ] {
        if let Some(j) = list
            .iter()
            .position(|c| c.trim().is_empty() || c.contains('\n'))
        {
            return Err(bad(
                format!("smoke.{key}[{j}]"),
                "is empty or spans lines".into(),
                "write one shell command per entry",
            ));
        }
    }
    let http = s
        .http
        .into_iter()
        .enumerate()
        .map(|(j, h)| {
            let RawHttp {
                port,
                path: p,
                status,
                contains,
            } = h;
            let p = p.unwrap_or_else(|| "/".to_owned());
            if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    format!("smoke.http[{j}].path"),
                    format!("`{p}` is not a URL path"),
                    "write a path such as \"/\" or \"/health\"",
                ));
            }
            let status = status.unwrap_or(200);
            if !(100..=599).contains(&status) {
                return Err(bad(
                    format!("smoke.http[{j}].status"),
                    format!("{status} is not an HTTP status"),
                    "use a status such as 200",
                ));
            }
            if port == 0 {
                return Err(bad(
                    format!("smoke.http[{j}].port"),
                    "port 0".into(),
                    "use the port the service listens on, e.g. 80",
                ));
            }
            Ok(HttpCheck {
                port,
                path: p,
                status,
                contains,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let ssh = s.ssh.unwrap_or(false);
    if !ssh && !s.ssh_checks.is_empty() {
        return Err(bad(
            "smoke.ssh_checks".into(),
            "is set, but `ssh` is not true, so kiln would not log in to run them".into(),
            "add `ssh = true` to [smoke] (the image needs an SSH server, e.g. extend ssh.toml)",
        ));
    }
    Ok(SmokeSpec {
        timeout,
        checks: s.checks,
        http,
        seed: s.seed,
        ssh,
        ssh_checks: s.ssh_checks,
        cloud_init: s.cloud_init.unwrap_or(false),
    })
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!("`{}` is not a valid name", truncate(name)))
    }
}

fn check_hostname(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{}` is not a valid hostname", truncate(h)))
    }
}

/// Debian policy 5.6.1: lowercase letters, digits, `+ - .`, at least two
/// characters, starting with a letter or digit.
fn check_package(p: &str) -> Result<(), String> {
    let ok = p.len() >= 2
        && p.len() <= 128
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!("`{}` is not a Debian package name", truncate(p)))
    }
}

/// The recipe's `owner`, root:root when unset.
fn parse_owner(owner: Option<String>) -> Result<Owner, String> {
    owner.as_deref().map_or(Ok(Owner::root()), Owner::parse)
}

/// An absolute path inside the image, with `.` and duplicate slashes
/// removed; `..` is refused rather than resolved.
pub fn normalize_dest(dest: &str) -> Result<String, String> {
    if !dest.starts_with('/') {
        return Err(format!("`{}` is not an absolute path", truncate(dest)));
    }
    if dest.contains('\0') || dest.chars().any(char::is_control) {
        return Err("contains control characters".to_owned());
    }
    let mut parts = Vec::new();
    for c in Path::new(dest).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => return Err(format!("`{}` contains `..`", truncate(dest))),
            Component::Prefix(_) => return Err("is not a Unix path".to_owned()),
        }
    }
    if parts.is_empty() {
        return Err("is the image's root directory itself".to_owned());
    }
    Ok(format!("/{}", parts.join("/")))
}

fn truncate(s: &str) -> String {
    const SHOWN: usize = 80;
    if s.chars().count() <= SHOWN {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(SHOWN).collect::<String>())
    }
}

#[cfg(test)]
mod tests;
