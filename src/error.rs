//! Errors a caller tells apart, because they map to different exit codes.
//!
//! Everything else is an `anyhow::Error` with context, exit code 1.

use std::fmt;
use std::path::{Path, PathBuf};

/// Exit codes, as documented in the README.
pub mod exit {
    pub const FAILURE: i32 = 1;
    pub const BAD_INPUT: i32 = 2;
    pub const SMOKE_FAILED: i32 = 3;
    /// Drift, or a signature that does not verify.
    pub const DRIFT: i32 = 4;
    pub const INTERRUPTED: i32 = 130;
}

/// Bad input from the user: a recipe, a lock file or an argument. Always
/// names the file, the key and how to fix it. Exit code 2.
#[derive(Debug)]
pub struct BadInput {
    pub file: Option<PathBuf>,
    pub key: Option<String>,
    pub problem: String,
    pub fix: String,
}

impl BadInput {
    pub fn new(
        file: &Path,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> BadInput {
        BadInput {
            file: Some(file.to_owned()),
            key: Some(key.into()),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// A whole file that is wrong (a key file), not one key in it.
    pub fn file(path: &Path, problem: impl Into<String>, fix: impl Into<String>) -> BadInput {
        BadInput {
            file: Some(path.to_owned()),
            key: None,
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Bad input that is not in a file (a command-line argument).
    pub fn arg(problem: impl Into<String>, fix: impl Into<String>) -> BadInput {
        BadInput {
            file: None,
            key: None,
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}\n  fix: {}", self.problem, self.fix)
    }
}

impl std::error::Error for BadInput {}

/// The image failed its smoke test (exit code 3): not "kiln broke".
#[derive(Debug, thiserror::Error)]
#[error("{image} failed its smoke test: {failure}\n  console log: {log}")]
pub struct SmokeFailed {
    pub image: String,
    pub failure: String,
    pub log: String,
}
/// A disk or a live system that no longer matches its manifest. Exit code 4.
#[derive(Debug, thiserror::Error)]
#[error("drift: {0}")]
pub struct Drift(pub String);

/// `kiln verify --trusted-key` found no good signature for the disk and
/// manifest (one line per failed check). Exit code 4, like drift: the
/// image is not what was built, or not by whom it should be.
#[derive(Debug, thiserror::Error)]
#[error("not verified: {0}")]
pub struct NotVerified(pub String);

/// Map an error chain to the process exit code.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<BadInput>() {
            return exit::BAD_INPUT;
        }
        if cause.is::<SmokeFailed>() {
            return exit::SMOKE_FAILED;
        }
        if cause.is::<Drift>() || cause.is::<NotVerified>() {
            return exit::DRIFT;
        }
        if cause.is::<crate::cmd::Interrupted>() {
            return exit::INTERRUPTED;
        }
    }
    if crate::cmd::interrupted() {
        return exit::INTERRUPTED;
    }
    exit::FAILURE
}
