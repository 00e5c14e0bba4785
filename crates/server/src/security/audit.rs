//! Refused actions: counted for `/metrics`, logged with who, from where, what and on which
//! function, at most [`LOG_BURST`] lines per [`LOG_WINDOW`] so that a misconfigured fleet
//! (or an attacker) cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const LOG_WINDOW: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 20;

/// What was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A submission of a function the identity may not submit.
    Submit,
    /// A CAN_DO of a function the identity may not work on.
    Work,
    /// GET_STATUS without a right to submit anything.
    Status,
    /// An admin command above the identity's admin right.
    Admin,
    /// OPTION_REQ auth= with a token the ACL does not know.
    Token,
    /// A TLS handshake that failed (no or a foreign client certificate, not TLS at all …).
    Handshake,
    /// A TLS ClientHello on a plaintext port.
    TlsOnPlain,
    /// An HTTP request without a valid token, or with a read-only one for a change.
    Http,
}

impl Refused {
    pub const ALL: [Refused; 8] = [
        Refused::Submit,
        Refused::Work,
        Refused::Status,
        Refused::Admin,
        Refused::Token,
        Refused::Handshake,
        Refused::TlsOnPlain,
        Refused::Http,
    ];

    /// The `action` label of `gearbox_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Submit => "submit",
            Refused::Work => "work",
            Refused::Status => "status",
            Refused::Admin => "admin",
            Refused::Token => "token",
            Refused::Handshake => "tls_handshake",
            Refused::TlsOnPlain => "tls_on_plaintext_port",
            Refused::Http => "http",
        }
    }
}

#[derive(Default)]
pub struct Audit {
    counts: [AtomicU64; Refused::ALL.len()],
    window: Mutex<Option<Window>>,
}

struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl Audit {
    /// Counts a refusal and logs it unless the log's budget for this window is spent.
    /// `identity` is the certificate CN or token identity (`anonymous` without either);
    /// `what` names the function, command or request path.
    pub fn refused(&self, action: Refused, identity: &str, peer: &str, what: &str) {
        self.counts[action as usize].fetch_add(1, Ordering::Relaxed);
        let mut window = self.window.lock().unwrap();
        let now = Instant::now();
        let w = match window.as_mut() {
            Some(w) if now.duration_since(w.started) < LOG_WINDOW => w,
            _ => {
                if let Some(w) = window.take().filter(|w| w.suppressed > 0) {
                    tracing::warn!(
                        "{} more refusals were not logged in the last {}s",
                        w.suppressed,
                        LOG_WINDOW.as_secs()
                    );
                }
                window.insert(Window { started: now, logged: 0, suppressed: 0 })
            }
        };
        if w.logged < LOG_BURST {
            w.logged += 1;
            tracing::warn!(action = action.label(), identity, peer, what, "refused");
        } else {
            w.suppressed += 1;
        }
    }

    /// Refusals so far, by action.
    pub fn counts(&self) -> Vec<(Refused, u64)> {
        Refused::ALL.iter().map(|&a| (a, self.counts[a as usize].load(Ordering::Relaxed))).collect()
    }
}
