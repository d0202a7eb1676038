//! The BEAM side of the tunnel, shipped inside the binary: the compiled
//! `distproxy_epmd` module (`deploy/erlang/distproxy_epmd.erl`) and
//! `distproxy install-module DIR`, which writes it where the application's
//! nodes load it from (`-pa DIR -epmd_module distproxy_epmd`).
//!
//! The `.beam` is committed next to its source, compiled by OTP 25 (the
//! oldest release distproxy supports; a module compiled by a release loads
//! on that release and later ones) with `erlc +deterministic`, and embedded
//! here, so the distroless image, which has no `erl`, can hand it to an
//! application container through a shared volume: no image rebuild.
//! `tests/e2e_install_module.rs` checks that it is the compiled source.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the module, as `-epmd_module distproxy_epmd` loads it.
pub const FILE_NAME: &str = "distproxy_epmd.beam";

/// The compiled module (OTP 25, `erlc +deterministic`).
pub const BEAM: &[u8] = include_bytes!("../deploy/erlang/distproxy_epmd.beam");

/// Why the module could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install {FILE_NAME} into {dir}: {source}")]
pub struct InstallError {
    dir: PathBuf,
    source: std::io::Error,
}

/// Writes [`BEAM`] as `dir/distproxy_epmd.beam` (creating `dir` if needed)
/// and returns the file's path. The file is written under a temporary name
/// and renamed, so a node starting at the same time never loads half a
/// module; an existing file is replaced.
pub fn install(dir: &Path) -> Result<PathBuf, InstallError> {
    let err = |source| InstallError {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(BEAM)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_module_is_a_beam_file_named_distproxy_epmd() {
        // IFF header, then the BEAM form type.
        assert_eq!(&BEAM[..4], b"FOR1");
        assert_eq!(&BEAM[8..12], b"BEAM");
        // The atom table names the module first.
        let at = BEAM
            .windows(4)
            .position(|w| w == b"AtU8")
            .expect("atom chunk");
        let name = b"distproxy_epmd";
        assert!(BEAM[at..at + 64].windows(name.len()).any(|w| w == name));
    }

    #[test]
    fn install_writes_the_module_and_replaces_an_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("new/sub");
        let path = install(&target).unwrap();
        assert_eq!(path, target.join(FILE_NAME));
        assert_eq!(std::fs::read(&path).unwrap(), BEAM);
        std::fs::write(&path, b"stale").unwrap();
        install(&target).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), BEAM);
        // Nothing else is left behind.
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);
    }

    #[test]
    fn install_into_a_file_fails_naming_the_directory() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = install(file.path()).unwrap_err();
        assert!(
            e.to_string().contains(&file.path().display().to_string()),
            "{e}"
        );
    }
}
