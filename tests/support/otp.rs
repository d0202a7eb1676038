//! OTP releases: which `erl`, `erlc` and `elixir` a node runs.
//!
//! The host's own release (Debian 12: OTP 25, Elixir 1.14) is the default.
//! Other releases run from Debian root filesystems that
//! `scripts/otp-rootfs.sh` builds once under `target/otp-rootfs/<release>/`
//! (trixie: OTP 27, sid: OTP 29). A node of such a release is started in its
//! pod as
//!
//! ```text
//! ip netns exec <pod> sh -c '<bind mounts>; exec chroot ROOTFS env -C DIR erl ...'
//! ```
//!
//! so it shares the pod's network (loopback, address, sidecar) like any
//! other node. `ip netns exec` runs every command in a mount namespace of its
//! own whose mounts do not propagate back to the host (mount propagation
//! "slave"), so the bind mounts made there — the pod's `/etc/hosts` and
//! `/etc/resolv.conf` (which `ip netns exec` itself bound over the host's
//! `/etc/`), `/proc`, `/dev`, and the temp directory holding the lab (agent
//! `.beam`s, logs, `HOME`) — are seen by that node only and vanish with its
//! last process: nothing is left to unmount, even when a test fails.
//! Outside a pod (compiling with a release's `erlc`), `unshare --mount
//! --propagation slave` gives the same.
//!
//! Variables: `DISTPROXY_OTP_ROOTFS` overrides `target/otp-rootfs`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Overrides the directory holding one root filesystem per release.
pub const ROOTFS_VAR: &str = "DISTPROXY_OTP_ROOTFS";

/// An OTP release of the matrix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Otp {
    /// OTP 25 (Debian 12): the host's own `erl` unless a root filesystem
    /// `target/otp-rootfs/25` exists (the script builds one when the host's
    /// release is another).
    #[default]
    V25,
    /// OTP 27 (Debian trixie).
    V27,
    /// OTP 29 (Debian sid).
    V29,
}

impl Otp {
    /// Every release of the matrix, oldest first.
    pub const ALL: [Otp; 3] = [Otp::V25, Otp::V27, Otp::V29];

    /// The major release, as `erlang:system_info(otp_release)` reports it.
    pub fn release(self) -> &'static str {
        match self {
            Otp::V25 => "25",
            Otp::V27 => "27",
            Otp::V29 => "29",
        }
    }

    /// Root filesystem of this release, or `None` for the host's own.
    /// Panics, saying how to build it, when a needed tree is missing.
    pub fn rootfs(self) -> Option<PathBuf> {
        let dir = rootfs_base().join(self.release());
        let built = dir.join(".distproxy-otp").is_file();
        match self {
            Otp::V25 if !built => None,
            _ => {
                assert!(
                    built,
                    "no OTP {} root filesystem in {}: run `bash scripts/otp-rootfs.sh` \
                     (needs root, mmdebstrap and access to deb.debian.org; \
                     scripts/test-all.sh runs it)",
                    self.release(),
                    dir.display()
                );
                Some(dir)
            }
        }
    }

    /// Whether this release can run here: the host's `erl` or a built tree.
    /// The reason when it cannot.
    pub fn check(self) -> Result<(), String> {
        let dir = rootfs_base().join(self.release());
        if dir.join(".distproxy-otp").is_file() || self == Otp::V25 {
            Ok(())
        } else {
            Err(format!(
                "no OTP {} root filesystem in {} (run `bash scripts/otp-rootfs.sh`)",
                self.release(),
                dir.display()
            ))
        }
    }

    /// A command running `program` of this release inside network namespace
    /// `ns` (or, with `None`, in the host's network, e.g. `erlc`). The
    /// caller adds the arguments.
    pub fn command(self, ns: Option<&str>, program: &str) -> Command {
        let mut cmd = match ns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]);
                cmd
            }
            None => Command::new("unshare"),
        };
        let Some(rootfs) = self.rootfs() else {
            if ns.is_none() {
                // Plain host program: no namespace needed.
                return Command::new(program);
            }
            cmd.arg(program);
            return cmd;
        };
        if ns.is_none() {
            cmd.args(["--mount", "--propagation", "slave"]);
        }
        cmd.args(["sh", "-c", CHROOT_SCRIPT, "otp-chroot"])
            .arg(&rootfs)
            .arg(std::env::temp_dir())
            .arg(program);
        cmd
    }
}

impl fmt::Display for Otp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OTP {}", self.release())
    }
}

/// `sh -c` script: `$1` root filesystem, `$2` temp directory, then the
/// program and its arguments. Runs in a mount namespace of its own (see the
/// module docs); binds what a node needs and runs the program in the tree,
/// in the caller's working directory.
const CHROOT_SCRIPT: &str = r#"set -e
r=$1; t=$2; shift 2
mount --bind /proc "$r/proc"
mount --rbind /dev "$r/dev"
mount --bind /etc/hosts "$r/etc/hosts"
mount --bind /etc/resolv.conf "$r/etc/resolv.conf"
mkdir -p "$r$t"
mount --rbind "$t" "$r$t"
exec chroot "$r" env -C "$PWD" "$@""#;

fn rootfs_base() -> PathBuf {
    std::env::var_os(ROOTFS_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/otp-rootfs"))
}

/// Compiles the Erlang source `src` with release `otp`'s `erlc` (plus
/// `flags`, e.g. `+warnings_as_errors`) into `ebin`, killed after 60 s.
/// Both paths must lie in the temp directory (the lab), which the release's
/// tree sees at the same path. Panics with erlc's output on failure.
pub fn erlc(otp: Otp, flags: &[&str], src: &Path, ebin: &Path) {
    std::fs::create_dir_all(ebin).expect("create ebin directory");
    let mut cmd = otp.command(None, "timeout");
    cmd.args(["-k", "2", "300", "erlc"])
        .args(flags)
        .arg("-o")
        .arg(ebin)
        .arg(src)
        .current_dir(ebin)
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run erlc of {otp}: {e}"));
    assert!(
        out.status.success(),
        "erlc {} {} of {otp} failed ({}):\n{}{}",
        flags.join(" "),
        src.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
