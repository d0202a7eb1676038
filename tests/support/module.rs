//! The Erlang helper module `distproxy_epmd` (`deploy/erlang/`), which
//! sends a node's connections through the sidecar's tunnel: compiled per
//! lab or installed by `distproxy install-module` (the `.beam` the binary
//! carries), and the documented `erl` flags that load it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::beam::ErlangOptions;
use super::lab::Lab;
use super::otp::{erlc, Otp};

/// Source of the helper module, as deployed.
pub const MODULE_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/erlang/distproxy_epmd.erl"
);

/// Compiles `distproxy_epmd.erl` with warnings as errors into the lab;
/// returns the ebin directory for [`with_module`].
pub fn compile_module(lab: &Lab) -> PathBuf {
    let ebin = lab.dir().join("tunnel-ebin");
    compile_erl(MODULE_SRC.as_ref(), &ebin);
    ebin
}

/// Compiles `distproxy_epmd.erl` with warnings as errors with release
/// `otp`'s `erlc` into the lab (`tunnel-ebin-<release>`); returns the ebin
/// directory for [`with_module`]. A node of any release may load it.
pub fn compile_module_with(lab: &Lab, otp: Otp) -> PathBuf {
    let src = lab.dir().join("distproxy_epmd.erl");
    if !src.is_file() {
        std::fs::copy(MODULE_SRC, &src).expect("copy the helper module into the lab");
    }
    let ebin = lab.dir().join(format!("tunnel-ebin-{}", otp.release()));
    erlc(otp, &["+warnings_as_errors"], &src, &ebin);
    assert!(
        ebin.join("distproxy_epmd.beam").is_file(),
        "erlc of {otp} wrote no distproxy_epmd.beam"
    );
    ebin
}

/// Runs `distproxy install-module DIR` (the binary under test) with DIR in
/// the lab, as the manifests' init container does; returns DIR.
pub fn install_module(lab: &Lab) -> PathBuf {
    let dir = lab.dir().join("installed-module");
    let out = Command::new(super::distproxy_bin())
        .arg("install-module")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("run distproxy install-module");
    assert!(
        out.status.success(),
        "distproxy install-module {} failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("distproxy_epmd.beam").is_file());
    dir
}

/// Compiles the Erlang source `src` into `ebin` (created if missing) with
/// `erlc +warnings_as_errors`, killed after 60 s; panics with its output on
/// failure.
pub fn compile_erl(src: &Path, ebin: &Path) {
    std::fs::create_dir_all(ebin).unwrap();
    let out = Command::new("timeout")
        .args(["-k", "2", "300", "erlc", "+warnings_as_errors", "-o"])
        .arg(ebin)
        .arg(src)
        .stdin(Stdio::null())
        .output()
        .expect("run erlc");
    assert!(
        out.status.success(),
        "erlc +warnings_as_errors {} failed:\n{}{}",
        src.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The documented flags, `-pa DIR -epmd_module distproxy_epmd`, with `ebin`
/// from [`compile_module`]. Other options by struct update, e.g.
/// `ErlangOptions { name: Some(..), ..with_module(&ebin) }`.
pub fn with_module(ebin: &Path) -> ErlangOptions {
    ErlangOptions {
        extra_args: vec![
            "-pa".into(),
            ebin.display().to_string(),
            "-epmd_module".into(),
            "distproxy_epmd".into(),
        ],
        ..Default::default()
    }
}
