//! Embeds the `ovmf-prebuilt` crate's firmware in kiln, as the firmware of
//! last resort (see src/smoke/firmware.rs). The crate only hands out a path
//! inside the cargo registry, which an installed kiln cannot rely on, so the
//! file's bytes go into the binary instead.

fn main() {
    let fd = ovmf_prebuilt::ovmf_pure_efi();
    println!("cargo:rerun-if-changed={}", fd.display());
    println!("cargo:rustc-env=KILN_OVMF_PREBUILT={}", fd.display());
}
