//! Watching the PEM files and swapping in new configurations.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{self as m};

use super::load::{build, Generation, PemFiles};
use super::{PeerIdentity, Tls, TlsLoadError};

/// How long a state that cannot be loaded is given to change (the rest of
/// a rotation written file by file) before it is reported; at most the
/// reload interval.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);
/// Looks again while the files keep changing, at most.
const SETTLE_LOOKS: usize = 5;

/// The files' contents as [`TlsReloader::settled`] found them.
enum Look {
    /// The contents in force.
    InForce,
    /// Contents that failed and were reported already.
    Reported,
    /// Other contents (digest), and what they build.
    New(u64, Result<Generation, TlsLoadError>),
}

/// What one look at the files found.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Same contents as loaded (or the same bad contents as last time).
    Unchanged,
    /// New contents loaded; new handshakes use them.
    Reloaded(PeerIdentity),
    /// New contents that cannot be used; the previous ones stay.
    Failed(TlsLoadError),
    /// A new certificate that is not valid yet (issued by a clock ahead of
    /// this one) while the current one still is: the current one stays
    /// until the new one's `notBefore`, then the new one is taken.
    Waiting(PeerIdentity),
}

/// Watches the three files and swaps in new configurations when their
/// contents change (see the module documentation).
pub struct TlsReloader {
    tls: Arc<Tls>,
    /// Digest of the last state that failed, so it is reported once.
    last_failed: Option<u64>,
    /// Digest of the not-yet-valid state waited for, so it is logged once.
    last_waiting: Option<u64>,
}

impl TlsReloader {
    pub(super) fn new(tls: Arc<Tls>) -> TlsReloader {
        TlsReloader {
            tls,
            last_failed: None,
            last_waiting: None,
        }
    }

    /// One look at the files (blocking file I/O: small reads; a state
    /// that cannot be loaded is read again after a short pause, see
    /// [`TlsReloader::settled`]).
    pub fn poll(&mut self) -> ReloadOutcome {
        let settings = &self.tls.settings;
        let (digest, built) = match self.settled() {
            Look::InForce => {
                self.last_failed = None;
                self.last_waiting = None;
                return ReloadOutcome::Unchanged;
            }
            Look::Reported => return ReloadOutcome::Unchanged,
            Look::New(digest, built) => (digest, built),
        };
        // An expired certificate is refused by every peer: keep the current
        // one rather than swap it in. One not valid yet (a clock ahead of
        // this one issued it) waits while the current one is still valid,
        // so a rotation never leaves a gap; it is taken at once, with a
        // warning, when the current one is outside its validity too.
        let now = unix_now();
        let current_valid = self
            .tls
            .current
            .load()
            .local
            .validity_problem(now)
            .is_none();
        let generation = match built {
            Ok(g) => match g.local.validity_problem(now) {
                Some(problem) if now > g.local.not_after => Err(TlsLoadError::Invalid {
                    what: "tls.cert_file",
                    path: settings.cert_file.clone(),
                    message: problem,
                }),
                Some(problem) if current_valid => {
                    if self.last_waiting != Some(digest) {
                        self.last_waiting = Some(digest);
                        info!(cert = %settings.cert_file.display(), %problem,
                            current = %self.tls.current.load().local,
                            "new TLS certificate is not valid yet; keeping the current one until it is");
                    }
                    return ReloadOutcome::Waiting(g.local.clone());
                }
                Some(problem) => {
                    warn!(cert = %settings.cert_file.display(), %problem,
                        "new TLS certificate is not valid yet, nor is the current one; taking the new one (peers refuse it until it is valid)");
                    Ok(g)
                }
                None => Ok(g),
            },
            Err(e) => Err(e),
        };
        match generation {
            Ok(generation) => {
                // In force and counted before the line that says so.
                let identity = generation.local.clone();
                self.tls.current.store(Arc::new(generation));
                self.last_failed = None;
                self.last_waiting = None;
                metrics::gauge!(m::TLS_CERT_NOT_AFTER).set(identity.not_after as f64);
                metrics::counter!(m::TLS_RELOADS).increment(1);
                info!(cert = %settings.cert_file.display(),
                    resolved = %resolved(&settings.cert_file).display(),
                    identity = %identity, "TLS files changed; new connections use the new certificate");
                ReloadOutcome::Reloaded(identity)
            }
            Err(e) => {
                metrics::counter!(m::TLS_RELOAD_FAILURES).increment(1);
                self.last_failed = Some(digest);
                warn!(error = %e, current = %self.tls.current.load().local,
                    "TLS files changed but cannot be loaded; keeping the current certificate");
                ReloadOutcome::Failed(e)
            }
        }
    }

    /// What the files hold, once they hold still. A writer that replaces
    /// them one at a time (a `cp` of the new certificate, then of its key;
    /// a Kubernetes Secret volume swaps all three at once) leaves a
    /// certificate without its key for a moment: new contents that cannot
    /// be loaded are read again after [`SETTLE`], and only contents that
    /// did not change meanwhile are reported as failed, so a rotation done
    /// this way is one reload, not a failure first. Contents seen before
    /// are not built again.
    fn settled(&self) -> Look {
        let settings = &self.tls.settings;
        let read = || {
            let files = PemFiles::read(settings);
            let digest = match &files {
                Ok(f) => f.digest(),
                Err(e) => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    e.to_string().hash(&mut h);
                    h.finish()
                }
            };
            (digest, files)
        };
        let (mut digest, mut files) = read();
        let mut looks = 0;
        loop {
            if digest == self.tls.current.load().digest {
                return Look::InForce;
            }
            if self.last_failed == Some(digest) {
                return Look::Reported;
            }
            let built = files.and_then(|f| build(settings, &self.tls.provider, &f));
            if built.is_ok() || looks == SETTLE_LOOKS {
                return Look::New(digest, built);
            }
            looks += 1;
            std::thread::sleep(SETTLE.min(settings.reload_interval));
            let (again, again_files) = read();
            if again == digest {
                return Look::New(digest, built);
            }
            (digest, files) = (again, again_files);
        }
    }

    /// Polls every `reload_interval` until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.tls.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the files were just loaded
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self = match tokio::task::spawn_blocking(move || {
                self.poll();
                self
            })
            .await
            {
                Ok(me) => me,
                Err(e) => {
                    warn!(error = %e, "TLS reload task failed; reloading stops");
                    break;
                }
            };
        }
    }
}

/// The current time as Unix time.
pub(super) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The file a path finally points at (for logs), or the path itself.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
