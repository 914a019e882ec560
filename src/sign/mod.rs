//! Signing keys and signed envelopes: who vouches for an image.
//!
//! A kiln signing key is an Ed25519 key pair in Nix's text format, one line
//! each (`nix key generate-secret` makes the same files):
//!
//! ```text
//! NAME.key   NAME:base64(seed ‖ public key)   64 bytes, mode 0600
//! NAME.pub   NAME:base64(public key)          32 bytes, given to verifiers
//! ```
//!
//! The name travels with the key: it is the `keyid` of every signature the
//! key makes. A keyid is only a hint (anyone can write any name into an
//! envelope), so a verifier tries each key it trusts, never just the one the
//! keyid names. Rotation is trusting the old and the new public key for a
//! while.
//!
//! Keys reach a build on the command line (`--signing-key FILE`, or
//! `KILN_SIGNING_KEY`), never through a recipe: a recipe is committed, a
//! key must not be. A private key file that others may read is refused, as
//! ssh refuses one.
//!
//! What gets signed is a DSSE envelope ([`dsse`]) around the build's in-toto
//! statement (see `record::signed`). Ed25519 signatures are deterministic,
//! so the same statement and the same key give the same envelope, byte for
//! byte.
//!
//! Secure Boot needs RSA and X.509, which UEFI understands and Ed25519 is
//! not: `kiln key new --secure-boot` also has `openssl` write `NAME.sb.key`
//! and a self-signed `NAME.sb.crt` ([`key::new`]).

pub mod dsse;
pub mod key;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Standard base64 with padding: what Nix keys and DSSE signers write.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Standard or URL-safe base64, padded or not: what DSSE verifiers accept.
pub fn unb64(text: &str) -> Option<Vec<u8>> {
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    [alphabet::STANDARD, alphabet::URL_SAFE]
        .iter()
        .find_map(|a| GeneralPurpose::new(a, config).decode(text).ok())
}
