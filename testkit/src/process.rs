//! Child processes that cannot outlive their owner.
//!
//! Every process the harness starts leads its own process group, so killing
//! the group also reaches what it forked (`erl_child_setup`, `inet_gethost`,
//! a shell's children). Dropping a [`Proc`] kills the group and reaps the
//! leader, so a panicking test leaves nothing of it running.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// A started child process, killed with its process group on drop.
pub struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` as the leader of a new process group. `log` is where the
    /// caller directed its output (shown in failure messages).
    pub fn spawn(label: &str, cmd: &mut Command, log: &Path) -> Proc {
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {label} ({cmd:?}): {e}"));
        Proc {
            label: label.to_string(),
            child,
            log: log.to_path_buf(),
            exit: None,
        }
    }

    /// Like [`Proc::spawn`] for a command whose output goes elsewhere than
    /// a log file (inherited, piped).
    pub fn spawn_unlogged(label: &str, cmd: &mut Command) -> Proc {
        Proc::spawn(label, cmd, Path::new(""))
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log file's current contents (empty if unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (a name such as `TERM`, `KILL`) to the process
    /// itself, not its group.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "kill -s {signal} {} ({}) failed",
            self.child.id(),
            self.label
        );
    }

    /// Kills the whole process group with SIGKILL and reaps the leader.
    pub fn kill(&mut self) {
        // The group id is the leader's pid; the kernel keeps that id reserved
        // while any member of the group lives, even after the leader is reaped.
        let group = format!("-{}", self.child.id());
        let killed = Command::new("kill")
            .args(["-s", "KILL", "--", &group])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !killed && self.exit.is_none() {
            let _ = self.child.kill();
        }
        if self.exit.is_none() {
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The program named by `$override_var` when it is set and not empty,
/// otherwise `default` (see `distproxy_bin!`).
pub fn program_or_override(override_var: &str, default: &str) -> String {
    std::env::var(override_var)
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| default.to_string())
}
