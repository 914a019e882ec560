//! The recipe exactly as written in TOML. Nothing here is validated beyond
//! its shape: unknown keys are rejected by serde, everything else is checked
//! when the raw recipe is resolved into a [`super::Recipe`].

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub extends: Option<String>,
    pub image: Option<RawImage>,
    pub base: Option<RawBase>,
    #[serde(default, rename = "layer")]
    pub layers: Vec<RawLayer>,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<RawVolume>,
    pub smoke: Option<RawSmoke>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    pub name: Option<String>,
    pub size: Option<String>,
    pub format: Option<String>,
    pub formats: Option<Vec<String>>,
    pub hostname: Option<String>,
    pub cmdline: Option<String>,
    pub verity: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBase {
    pub suite: String,
    pub variant: Option<String>,
    #[serde(default)]
    pub packages: Vec<String>,
    pub mirror: Option<String>,
    pub initramfs: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLayer {
    pub name: String,
    #[serde(default)]
    pub upgrade: bool,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub files: Vec<RawFile>,
    #[serde(default)]
    pub run: Vec<String>,
    pub initramfs: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub src: String,
    pub dest: String,
    pub mode: Option<String>,
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVolume {
    pub name: String,
    pub mount: String,
    pub size: String,
    pub filesystem: Option<String>,
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmoke {
    pub timeout: Option<String>,
    #[serde(default)]
    pub checks: Vec<String>,
    #[serde(default)]
    pub http: Vec<RawHttp>,
    #[serde(default)]
    pub seed: Vec<String>,
    pub ssh: Option<bool>,
    #[serde(default)]
    pub ssh_checks: Vec<String>,
    pub cloud_init: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub port: u16,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub contains: Option<String>,
}
