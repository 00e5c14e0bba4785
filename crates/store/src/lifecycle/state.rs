//! Paused functions and schedule ticks: rows of the `state` table, keyed by kind and name.
//!
//! - `('paused', function)`: the function is paused; `value` is when it was paused (unix
//!   milliseconds).
//! - `('tick', schedule)`: `value` is the last tick the schedule fired (unix seconds), and
//!   `claimed_by` the token of the call that recorded it.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::conn::{Arg, Backend, DbConn, Dialect, Op};

const PAUSED: &str = "paused";
const TICK: &str = "tick";

/// `INSERT` of a state row that leaves an existing row of that kind and name alone.
fn insert_new(d: &Dialect, columns: &str, marks: &str) -> String {
    d.sql(&match d.backend {
        Backend::MySql => format!("INSERT IGNORE INTO {{state}} ({columns}) VALUES ({marks})"),
        Backend::Sqlite | Backend::Postgres => {
            format!("INSERT INTO {{state}} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING")
        }
    })
}

/// The paused functions.
pub(super) struct Paused;

impl Op for Paused {
    type Out = Vec<Vec<u8>>;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<Vec<Vec<u8>>> {
        let sql = d.sql("SELECT name FROM {state} WHERE kind = ? ORDER BY name");
        let rows: Vec<(Vec<u8>,)> = c.ex().rows(&sql, &[Arg::Text(PAUSED)]).await?;
        Ok(rows.into_iter().map(|(name,)| name).collect())
    }
}

/// Pauses or resumes a function.
pub(super) struct SetPaused<'a> {
    pub(super) function: &'a [u8],
    pub(super) paused: bool,
}

impl Op for SetPaused<'_> {
    type Out = ();

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<()> {
        let name = Arg::Bytes(self.function);
        if self.paused {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_millis() as i64);
            let sql = insert_new(d, "kind, name, value", "?, ?, ?");
            c.ex().exec(&sql, &[Arg::Text(PAUSED), name, Arg::Int(now)]).await?;
        } else {
            let sql = d.sql("DELETE FROM {state} WHERE kind = ? AND name = ?");
            c.ex().exec(&sql, &[Arg::Text(PAUSED), name]).await?;
        }
        Ok(())
    }
}

/// A compare-and-set of a schedule's last tick: see [`super::Lifecycle::claim_tick`].
pub(super) struct ClaimTick<'a> {
    name: &'a str,
    tick: i64,
    /// Recorded with the tick if this call wins it: a retry finds out whether the attempt
    /// that was cut off had won.
    token: i64,
}

impl<'a> ClaimTick<'a> {
    pub(super) fn new(name: &'a str, tick: i64) -> ClaimTick<'a> {
        ClaimTick { name, tick, token: fresh_token() }
    }
}

impl Op for ClaimTick<'_> {
    type Out = bool;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, again: bool) -> sqlx::Result<bool> {
        let (name, tick, token) = (Arg::Bytes(self.name.as_bytes()), self.tick, self.token);
        let mut ex = c.ex();
        if again {
            // The last attempt may have committed without hearing so.
            let sql = d.sql("SELECT value, claimed_by FROM {state} WHERE kind = ? AND name = ?");
            if let Some((value, by)) = ex.row::<(i64, Option<i64>)>(&sql, &[Arg::Text(TICK), name]).await? {
                if value == tick && by == Some(token) {
                    return Ok(true);
                }
                if value >= tick {
                    return Ok(false);
                }
            }
        }
        // Each statement is atomic on its own: of concurrent inserts one adds the row, and of
        // concurrent updates one finds `value < tick` (the others wait for it, and then see
        // the new value).
        let insert = insert_new(d, "kind, name, value, claimed_by", "?, ?, ?, ?");
        if ex.exec(&insert, &[Arg::Text(TICK), name, Arg::Int(tick), Arg::Int(token)]).await? == 1 {
            return Ok(true);
        }
        let update = d.sql("UPDATE {state} SET value = ?, claimed_by = ? WHERE kind = ? AND name = ? AND value < ?");
        let updated =
            ex.exec(&update, &[Arg::Int(tick), Arg::Int(token), Arg::Text(TICK), name, Arg::Int(tick)]).await?;
        Ok(updated == 1)
    }
}

/// A schedule's last tick.
pub(super) struct LastTick<'a>(pub(super) &'a str);

impl Op for LastTick<'_> {
    type Out = Option<i64>;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<Option<i64>> {
        let sql = d.sql("SELECT value FROM {state} WHERE kind = ? AND name = ?");
        let row: Option<(i64,)> = c.ex().row(&sql, &[Arg::Text(TICK), Arg::Bytes(self.0.as_bytes())]).await?;
        Ok(row.map(|(value,)| value))
    }
}

/// A token no other call (of this process or another) draws: the standard library's
/// randomly keyed hasher over a counter, the process and the time.
fn fresh_token() -> i64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos()));
    h.finish() as i64
}

#[cfg(test)]
mod tests {
    use super::super::conn::SqlLifecycle;
    use super::super::LifecycleTarget;
    use super::*;

    /// A retry after a lost connection tells its own win (a COMMIT whose reply was lost) from
    /// another caller's.
    #[test]
    fn a_retry_reports_its_own_win_once() {
        let lc = SqlLifecycle::open(LifecycleTarget::Memory).unwrap();
        let mut first = ClaimTick::new("s", 10);
        let token = first.token;
        assert!(lc.run(&mut first).unwrap());
        // The same call again, as after its reply was lost: it won.
        assert!(lc.run_as_retry(&mut ClaimTick { name: "s", tick: 10, token }).unwrap());
        // Another call's retry of the same tick did not.
        assert!(!lc.run_as_retry(&mut ClaimTick::new("s", 10)).unwrap());
        assert!(!lc.run_as_retry(&mut ClaimTick::new("s", 9)).unwrap());
        // A retry of a later tick that the cut-off attempt never recorded goes on to claim it.
        assert!(lc.run_as_retry(&mut ClaimTick::new("s", 11)).unwrap());
        assert!(!lc.run(&mut ClaimTick::new("s", 11)).unwrap());
        // And of a schedule with no row yet.
        assert!(lc.run_as_retry(&mut ClaimTick::new("t", 1)).unwrap());
    }

    #[test]
    fn tokens_differ() {
        let tokens: std::collections::HashSet<i64> = (0..10_000).map(|_| fresh_token()).collect();
        assert_eq!(tokens.len(), 10_000);
    }
}
