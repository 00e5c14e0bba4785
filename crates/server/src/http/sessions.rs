//! The dashboard's login sessions: a random id the browser keeps in an HttpOnly cookie, and
//! here the role of the token that opened it, its CSRF token and when it expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::auth::Role;

/// How long a login lasts.
pub(super) const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept: past it, the one closest to expiring makes room.
const MOST: usize = 10_000;

/// What a valid session cookie stands for.
#[derive(Clone)]
pub(super) struct Session {
    pub role: Role,
    /// The token state-changing requests must send back in `X-CSRF-Token`.
    pub csrf: String,
}

#[derive(Default)]
pub(super) struct Sessions {
    open: Mutex<HashMap<String, (Session, Instant)>>,
}

impl Sessions {
    /// Opens a session for `role`: its id (for the cookie) and the session.
    pub fn open(&self, role: Role) -> (String, Session) {
        let (id, session) = (random_token(), Session { role, csrf: random_token() });
        let now = Instant::now();
        let mut open = self.open.lock().unwrap();
        open.retain(|_, (_, expires)| *expires > now);
        if open.len() >= MOST {
            let soonest = open.iter().min_by_key(|(_, (_, expires))| *expires).map(|(id, _)| id.clone());
            open.remove(&soonest.expect("not empty"));
        }
        open.insert(id.clone(), (session.clone(), now + LIFETIME));
        (id, session)
    }

    /// The session with this id, unless it expired or was closed.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut open = self.open.lock().unwrap();
        match open.get(id) {
            Some((session, expires)) if *expires > Instant::now() => Some(session.clone()),
            Some(_) => {
                open.remove(id);
                None
            }
            None => None,
        }
    }

    /// Logs a session out.
    pub fn close(&self, id: &str) {
        self.open.lock().unwrap().remove(id);
    }
}

/// 256 random bits from the operating system, in hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random numbers");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_are_found_and_closed() {
        let sessions = Sessions::default();
        let (id, session) = sessions.open(Role::Read);
        assert_eq!((id.len(), session.csrf.len()), (64, 64));
        assert_ne!(id, session.csrf);
        let found = sessions.get(&id).unwrap();
        assert_eq!((found.role, found.csrf), (Role::Read, session.csrf));
        assert!(sessions.get("nope").is_none());
        sessions.close(&id);
        assert!(sessions.get(&id).is_none());
    }
}
