//! A KubeVirt containerDisk: an OCI image whose one layer holds the disk
//! as `/disk/NAME.qcow2`, owned by 107:107 (the qemu user in KubeVirt's
//! launcher) with mode 0440, written by kiln as an OCI image archive (a
//! tar of an OCI image layout) without podman or a daemon:
//!
//! ```text
//! NAME.containerdisk.tar
//! ├── oci-layout                 {"imageLayoutVersion":"1.0.0"}
//! ├── index.json                 the one manifest
//! └── blobs/sha256/
//!     ├── <manifest>             config + one layer
//!     ├── <config>               amd64/linux, rootfs.diff_ids = [sha256 of the layer's tar]
//!     └── <layer>                gzip of a tar: disk/ and disk/NAME.qcow2
//! ```
//!
//! `skopeo copy oci-archive:out/NAME.containerdisk.tar docker://REGISTRY/NAME:TAG`
//! pushes it; `kiln push --containerdisk` sends the same blobs
//! ([`write_image`]) to a registry itself, without the archive. The same qcow2, name and SOURCE_DATE_EPOCH give the same
//! bytes and so the same digests: every tar header has that mtime, owner
//! numbers and no owner names, entries are in a fixed order, the gzip
//! stream has no name or time, and the JSON has sorted keys.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::plan::key::hex;

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// KubeVirt's launcher runs QEMU as this user and group.
pub const QEMU_ID: u64 = 107;
/// The disk is read-only to its owner: KubeVirt puts a writable overlay
/// over a containerDisk.
pub const DISK_MODE: u32 = 0o440;
/// gzip level of the layer: the fastest, because the qcow2's free clusters
/// are already absent and the layer is compressed once per image.
const LAYER_GZIP_LEVEL: u32 = 1;

/// A blob of the layout: its digest (`sha256:…`) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

impl Blob {
    fn of(data: &[u8]) -> Blob {
        Blob {
            digest: format!("sha256:{}", hex(&Sha256::digest(data))),
            size: data.len() as u64,
        }
    }

    fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// A containerDisk's three blobs: the layer in a file (it holds the whole
/// disk), the config and the manifest in memory (small JSON). What an
/// archive holds and what `kiln push --containerdisk` sends.
pub struct Image {
    pub layer_path: PathBuf,
    pub layer: Blob,
    pub config: Vec<u8>,
    pub config_blob: Blob,
    pub manifest: Vec<u8>,
    /// The image's identity in a registry.
    pub manifest_blob: Blob,
    /// The sha256 of the qcow2 as it was read into the layer.
    pub disk_sha256: String,
}

/// Write the layer of `qcow2`'s containerDisk (shipped as
/// `/disk/NAME.qcow2`) to `scratch/layer.tar.gz`, and its config and
/// manifest: one pass over the disk.
pub fn write_image(qcow2: &Path, name: &str, epoch: u64, scratch: &Path) -> Result<Image> {
    let layer_path = scratch.join("layer.tar.gz");
    let (layer, diff_id, disk_sha256) = write_layer(qcow2, name, epoch, &layer_path)?;
    let config = config_json(&diff_id, epoch);
    let config_blob = Blob::of(&config);
    let manifest = manifest_json(&config_blob, &layer, name, epoch);
    let manifest_blob = Blob::of(&manifest);
    Ok(Image {
        layer_path,
        layer,
        config,
        config_blob,
        manifest,
        manifest_blob,
        disk_sha256,
    })
}

/// Write the containerDisk of `qcow2` (shipped as `/disk/NAME.qcow2`) to
/// `dest`, using `scratch` for the layer. Returns the manifest's digest,
/// the image's identity in a registry.
pub fn write_archive(
    qcow2: &Path,
    name: &str,
    epoch: u64,
    scratch: &Path,
    dest: &Path,
) -> Result<Blob> {
    let Image {
        layer_path,
        layer,
        config,
        config_blob,
        manifest,
        manifest_blob,
        disk_sha256: _,
    } = write_image(qcow2, name, epoch, scratch)?;
    let index = index_json(&manifest_blob);

    let file =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |path: &str, data: &mut dyn std::io::Read, size: u64, dir: bool| {
        let header = header(path, size, if dir { 0o755 } else { 0o644 }, 0, epoch, dir);
        tar.append(&header, data)
            .with_context(|| format!("writing {path} into {}", dest.display()))
    };
    add(
        "oci-layout",
        &mut &OCI_LAYOUT[..],
        OCI_LAYOUT.len() as u64,
        false,
    )?;
    add("index.json", &mut &index[..], index.len() as u64, false)?;
    add("blobs/", &mut std::io::empty(), 0, true)?;
    add("blobs/sha256/", &mut std::io::empty(), 0, true)?;
    // In digest order; the layer is read from its file.
    let mut blobs = [
        (&config_blob, Some(&config[..])),
        (&manifest_blob, Some(&manifest[..])),
        (&layer, None),
    ];
    blobs.sort_by(|a, b| a.0.digest.cmp(&b.0.digest));
    for (blob, data) in blobs {
        let path = format!("blobs/sha256/{}", blob.hex());
        match data {
            Some(mut bytes) => add(&path, &mut bytes, blob.size, false)?,
            None => {
                let mut file = std::fs::File::open(&layer_path)
                    .with_context(|| format!("opening {}", layer_path.display()))?;
                add(&path, &mut file, blob.size, false)?
            }
        }
    }
    let out = tar
        .into_inner()
        .with_context(|| format!("finishing {}", dest.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", dest.display()))?;
    std::fs::remove_file(&layer_path)
        .with_context(|| format!("removing {}", layer_path.display()))?;
    Ok(manifest_blob)
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The layer: a tar holding `disk/` and `disk/NAME.qcow2`, gzip-compressed
/// into `dest`. Returns the compressed blob, the diff id (the digest of
/// the uncompressed tar) and the disk's sha256, in one pass over the disk.
fn write_layer(
    qcow2: &Path,
    name: &str,
    epoch: u64,
    dest: &Path,
) -> Result<(Blob, String, String)> {
    let file =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let compressed = Hashing::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(compressed, flate2::Compression::new(LAYER_GZIP_LEVEL));
    let mut tar = tar::Builder::new(Hashing::new(gz));
    let disk =
        std::fs::File::open(qcow2).with_context(|| format!("opening {}", qcow2.display()))?;
    let size = disk
        .metadata()
        .with_context(|| format!("reading {}", qcow2.display()))?
        .len();
    let dir = header("disk/", 0, 0o755, QEMU_ID, epoch, true);
    tar.append(&dir, std::io::empty())
        .context("writing the layer")?;
    let file = header(
        &format!("disk/{name}.qcow2"),
        size,
        DISK_MODE,
        QEMU_ID,
        epoch,
        false,
    );
    let mut disk = Hashing::new(disk);
    tar.append(&file, &mut disk)
        .with_context(|| format!("writing {} into the layer", qcow2.display()))?;
    let disk_sha256 = hex(&disk.hasher.finalize());
    let uncompressed = tar.into_inner().context("finishing the layer's tar")?;
    let diff_id = format!("sha256:{}", hex(&uncompressed.hasher.finalize()));
    let compressed = uncompressed
        .inner
        .finish()
        .context("finishing the layer's gzip")?;
    let digest = format!("sha256:{}", hex(&compressed.hasher.finalize()));
    let size = compressed.count;
    compressed
        .inner
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", dest.display()))?;
    Ok((Blob { digest, size }, diff_id, disk_sha256))
}

/// A ustar header with nothing of the host in it: the given owner numbers,
/// no owner names, the build's clock.
fn header(path: &str, size: u64, mode: u32, id: u64, epoch: u64, dir: bool) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    // Paths here are short and ASCII: set_path cannot fail.
    h.set_path(path).expect("a short ASCII path");
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(id);
    h.set_gid(id);
    h.set_mtime(epoch);
    h.set_cksum();
    h
}

/// The image config: a platform and the layer's diff id; no command (a
/// containerDisk is never run, KubeVirt copies the disk out of it).
pub fn config_json(diff_id: &str, epoch: u64) -> Vec<u8> {
    let created = crate::record::rfc3339(epoch);
    to_json(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": "kiln: containerDisk" }],
    }))
}

pub fn manifest_json(config: &Blob, layer: &Blob, name: &str, epoch: u64) -> Vec<u8> {
    to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": { "mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size },
        "layers": [{ "mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size }],
        "annotations": {
            "org.opencontainers.image.created": crate::record::rfc3339(epoch),
            "org.opencontainers.image.title": name,
        },
    }))
}

pub fn index_json(manifest: &Blob) -> Vec<u8> {
    to_json(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": manifest.digest,
            "size": manifest.size,
            "platform": { "architecture": "amd64", "os": "linux" },
        }],
    }))
}

/// Compact JSON with sorted keys (serde_json's map is ordered), so the
/// same values give the same digest.
fn to_json(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a JSON value serialises")
}

/// A writer (or reader) that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn blob(byte: char, size: u64) -> Blob {
        Blob {
            digest: format!("sha256:{}", byte.to_string().repeat(64)),
            size,
        }
    }

    #[test]
    fn the_manifest_names_the_config_and_one_gzip_layer_by_digest_and_size() {
        let m: serde_json::Value =
            serde_json::from_slice(&manifest_json(&blob('c', 300), &blob('l', 9000), "web", 0))
                .unwrap();
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["mediaType"], MANIFEST_TYPE);
        assert_eq!(m["config"]["mediaType"], CONFIG_TYPE);
        assert_eq!(m["config"]["digest"], blob('c', 0).digest);
        assert_eq!(m["config"]["size"], 300);
        assert_eq!(m["layers"].as_array().unwrap().len(), 1);
        assert_eq!(m["layers"][0]["mediaType"], LAYER_TYPE);
        assert_eq!(m["layers"][0]["size"], 9000);
        assert_eq!(
            m["annotations"]["org.opencontainers.image.created"],
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn the_config_and_index_are_what_oci_readers_expect() {
        let c: serde_json::Value =
            serde_json::from_slice(&config_json("sha256:abc", 1_700_000_000)).unwrap();
        assert_eq!(c["rootfs"]["type"], "layers");
        assert_eq!(c["rootfs"]["diff_ids"][0], "sha256:abc");
        assert_eq!(
            (&c["architecture"], &c["os"]),
            (&json!("amd64"), &json!("linux"))
        );
        assert_eq!(c["created"], "2023-11-14T22:13:20Z");
        let i: serde_json::Value = serde_json::from_slice(&index_json(&blob('m', 42))).unwrap();
        assert_eq!(i["mediaType"], INDEX_TYPE);
        assert_eq!(i["manifests"][0]["mediaType"], MANIFEST_TYPE);
        assert_eq!(i["manifests"][0]["digest"], blob('m', 0).digest);
        assert_eq!(i["manifests"][0]["size"], 42);
        // Sorted keys, no spaces: the bytes are a function of the values.
        let text = String::from_utf8(index_json(&blob('m', 42))).unwrap();
        assert!(text.starts_with(r#"{"manifests":[{"digest":"#), "{text}");
    }

    /// Every entry of a tar: path, uid, gid, mode, mtime, content.
    type Entry = (String, u64, u64, u32, u64, Vec<u8>);

    fn entries(data: &[u8]) -> Vec<Entry> {
        let mut a = tar::Archive::new(data);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut content = Vec::new();
                e.read_to_end(&mut content).unwrap();
                let path = e.path().unwrap().display().to_string();
                assert_eq!(h.username().unwrap(), Some(""), "{path}: no owner name");
                let id = (h.uid().unwrap(), h.gid().unwrap());
                (
                    path,
                    id.0,
                    id.1,
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                    content,
                )
            })
            .collect()
    }

    #[test]
    fn the_archive_is_a_layout_whose_layer_holds_the_disk_as_qemu_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let qcow2 = dir.path().join("disk.qcow2");
        std::fs::write(&qcow2, b"QFI\xfb not really a qcow2").unwrap();
        let dest = dir.path().join("a.tar");
        let manifest = write_archive(&qcow2, "web", 1_700_000_000, dir.path(), &dest).unwrap();
        let data = std::fs::read(&dest).unwrap();
        let outer = entries(&data);
        let paths: Vec<&str> = outer.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            &paths[..4],
            ["oci-layout", "index.json", "blobs/", "blobs/sha256/"]
        );
        assert_eq!(paths.len(), 7, "{paths:?}");
        assert!(outer.iter().all(|e| e.1 == 0 && e.4 == 1_700_000_000));
        // Every blob is named by its digest.
        let blob = |digest: &str| -> Vec<u8> {
            let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
            let e = outer.iter().find(|e| e.0 == name).expect(&name);
            assert_eq!(format!("sha256:{}", hex(&Sha256::digest(&e.5))), digest);
            e.5.clone()
        };
        let index: serde_json::Value = serde_json::from_slice(&outer[1].5).unwrap();
        assert_eq!(index["manifests"][0]["digest"], manifest.digest);
        let m: serde_json::Value = serde_json::from_slice(&blob(&manifest.digest)).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(m["config"]["digest"].as_str().unwrap())).unwrap();
        let gz = blob(m["layers"][0]["digest"].as_str().unwrap());
        let mut layer = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut layer)
            .unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", hex(&Sha256::digest(&layer)))
        );
        let inner = entries(&layer);
        assert_eq!(inner.len(), 2);
        assert_eq!(inner[0].0, "disk/");
        let disk = &inner[1];
        assert_eq!(
            (disk.0.as_str(), disk.1, disk.2, disk.3, disk.4),
            ("disk/web.qcow2", 107, 107, 0o440, 1_700_000_000)
        );
        assert_eq!(disk.5, std::fs::read(&qcow2).unwrap());

        // Reproducible: the same disk, name and clock give the same bytes.
        let again = dir.path().join("b.tar");
        write_archive(&qcow2, "web", 1_700_000_000, dir.path(), &again).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), data);
        assert!(!dir.path().join("layer.tar.gz").exists());
    }
}
