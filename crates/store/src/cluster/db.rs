//! A cluster node's statements: joining (a new incarnation), renewing its lease, taking over
//! expired nodes, claiming unowned jobs, the status of any job, and the list of nodes. Each
//! [`ClusterDb`] is one connection, made again when lost; the server keeps one for the lease
//! and one for claims, so that a slow claim never delays a renewal.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::{Connection, Executor, Row};

use super::channel;
use super::schema::ensure_cluster_schema;
use crate::sql_conn::{is_connection_error, per_backend, Conn, Kind, Target, Tx};
use crate::sql_plan::push_placeholders;
use crate::{Loc, Result, StoreError, StoredJob};

/// `TABLE_leases` must fit the databases' 63-character names.
const MAX_TABLE: usize = 56;
/// Jobs of a retired node made claimable per statement (each its own transaction).
const FREE_CHUNK: u64 = 5000;

/// A node whose lease ran out, and how many of its jobs became claimable.
#[derive(Clone, Debug)]
pub struct Takeover {
    pub node: u64,
    pub address: String,
    pub jobs: u64,
    /// Another takeover of this node had begun (and was cut short, or is still freeing its
    /// jobs): this one went on with it.
    pub resumed: bool,
}

/// A node as its row shows it.
#[derive(Clone, Debug)]
pub struct NodeRow {
    pub id: u64,
    pub address: String,
    /// Since its last renewal, and until its lease ends (negative once it has), in the
    /// database's clock.
    pub renewed_ago: Duration,
    pub lease_left_micros: i64,
    /// What the node publishes with each renewal (JSON, the server's choice).
    pub info: String,
}

/// A job as its row shows it, for GET_STATUS on a node that does not own it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowStatus {
    pub running: bool,
    pub numerator: u32,
    pub denominator: u32,
}

/// What became of a cancel asked of the cluster's database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// No node owned it: its row is gone.
    Done,
    /// A node owns it (cancel it there): its id and address.
    Owned { node: u64, address: String },
    /// No such job.
    Unknown,
}

/// How GET_STATUS names a job.
#[derive(Clone, Copy, Debug)]
pub enum StatusKey<'a> {
    Seq(u64),
    Unique(&'a [u8]),
}

/// One connection to a cluster's tables.
pub struct ClusterDb {
    target: Arc<Target>,
    conn: Option<Conn>,
    /// Locks and transactions a paused node leaves open end after this (half the lease).
    stall: Duration,
}

impl ClusterDb {
    /// Connects to the cluster on the table `url` names, creating its tables if needed.
    /// `lease` is the nodes' lease. Errors: a bad URL or table name, an unreachable database,
    /// or a table that is not a cluster queue (a single server's, for one).
    pub async fn open(url: &str, lease: Duration) -> Result<ClusterDb> {
        let target = Target::parse(url, crate::sql::DEFAULT_TABLE)?;
        if target.table.len() > MAX_TABLE {
            return Err(StoreError::Database(format!(
                "{}: a cluster's table name has at most {MAX_TABLE} characters",
                target.public
            )));
        }
        let mut db = ClusterDb { target: Arc::new(target), conn: None, stall: (lease / 2).max(Duration::from_secs(1)) };
        let target = db.target.clone();
        ensure_cluster_schema(db.conn().await?, &target).await?;
        Ok(db)
    }

    /// Another connection to the same cluster, made when first used.
    pub fn another(&self) -> ClusterDb {
        ClusterDb { target: self.target.clone(), conn: None, stall: self.stall }
    }

    /// The URL without password, and the table.
    pub fn describe(&self) -> &str {
        &self.target.public
    }

    pub(crate) fn kind(&self) -> Kind {
        self.target.kind
    }

    pub(crate) fn table(&self) -> &str {
        &self.target.table
    }

    /// The connection, made (again) if needed.
    pub(crate) async fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let mut conn = self.target.connect().await.map_err(|e| self.target.error(e))?;
            let stall = self.stall;
            let setup = match conn.kind() {
                Kind::MySql => format!(
                    "SET SESSION tx_isolation = 'READ-COMMITTED', \
                     SESSION idle_transaction_timeout = {secs}, SESSION innodb_lock_wait_timeout = {secs}",
                    secs = stall.as_secs().max(1)
                ),
                Kind::Postgres => format!(
                    "SET idle_in_transaction_session_timeout = {ms}; SET lock_timeout = {ms}",
                    ms = stall.as_millis()
                ),
            };
            let setup = per_backend!(Conn, &mut conn, c, _DB => c.execute(setup.as_str()).await.map(drop));
            setup.map_err(|e| self.target.error(e))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Drops the connection: the next statement makes a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// The error, as a [`StoreError`]; a lost connection is made again next time.
    pub(crate) fn failed(&mut self, e: sqlx::Error) -> StoreError {
        if is_connection_error(&e) {
            self.conn = None;
        }
        self.target.error(e)
    }

    /// `sql` written with `?` placeholders and `{now}` for the database's clock, in this
    /// backend's syntax.
    pub(crate) fn sql(&self, sql: &str) -> String {
        let now = match self.kind() {
            Kind::MySql => "UTC_TIMESTAMP(6)",
            Kind::Postgres => "now()",
        };
        let sql = sql.replace("{t}", self.table()).replace("{now}", now);
        match self.kind() {
            Kind::MySql => sql,
            Kind::Postgres => {
                let mut out = String::with_capacity(sql.len() + 16);
                let mut n = 0;
                for ch in sql.chars() {
                    if ch == '?' {
                        n += 1;
                        out.push_str(&format!("${n}"));
                    } else {
                        out.push(ch);
                    }
                }
                out
            }
        }
    }

    /// `{now}` plus a bound number of microseconds.
    fn later(&self) -> &'static str {
        match self.kind() {
            Kind::MySql => "UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND",
            Kind::Postgres => "now() + ? * interval '1 microsecond'",
        }
    }

    /// Registers a new incarnation of this server, with a lease; returns its id.
    pub async fn join(&mut self, address: &str, lease: Duration) -> Result<u64> {
        let node = self.sql("INSERT INTO {t}_nodes (address, started_at) VALUES (?, {now})");
        let lease_row = self.sql(&format!(
            "INSERT INTO {{t}}_leases (id, renewed_at, lease_until, info) VALUES (?, {{now}}, {}, '')",
            self.later()
        ));
        let micros = lease.as_micros() as i64;
        let address: String = address.chars().take(255).collect();
        let conn = self.conn().await?;
        let outcome: sqlx::Result<i64> = async {
            let mut tx = per_backend!(Conn, &mut *conn, c, _DB => c.begin().await.map(Tx::from))?;
            let id = match &mut tx {
                Tx::MySql(t) => {
                    sqlx::query(&node).bind(&address).execute(&mut **t).await.map(|r| r.last_insert_id() as i64)?
                }
                Tx::Postgres(t) => {
                    sqlx::query_scalar(&format!("{node} RETURNING id")).bind(&address).fetch_one(&mut **t).await?
                }
            };
            per_backend!(Tx, &mut tx, t, DB => {
                sqlx::query::<DB>(&lease_row).bind(id).bind(micros).execute(&mut **t).await.map(drop)
            })?;
            per_backend!(Tx, tx, t, _DB => t.commit().await)?;
            Ok(id)
        }
        .await;
        outcome.map(|id| id as u64).map_err(|e| self.failed(e))
    }

    /// Extends the lease of `node` by `lease` from now and publishes `info`. False if the
    /// lease had already ended (or the node was taken over): the incarnation is over.
    pub async fn renew(&mut self, node: u64, lease: Duration, info: &str) -> Result<bool> {
        let sql = self.sql(&format!(
            "UPDATE {{t}}_leases SET renewed_at = {{now}}, lease_until = {}, info = ? \
             WHERE id = ? AND lease_until > {{now}}",
            self.later()
        ));
        let micros = lease.as_micros() as i64;
        let conn = self.conn().await?;
        let rows = per_backend!(Conn, conn, c, DB => {
            sqlx::query::<DB>(&sql).bind(micros).bind(info).bind(node as i64).execute(c).await.map(|r| r.rows_affected())
        });
        rows.map(|n| n == 1).map_err(|e| self.failed(e))
    }

    /// Takes over every node whose lease has ended. For each, one short transaction locks its
    /// lease row (no renewal gets in), checks it again and deletes its node row (which waits for
    /// any write of that node already past its fence, and fails every later one); then its jobs
    /// become claimable in chunks, each committed, and the lease row goes last. A takeover cut
    /// short (this node died, a timeout) is finished by the next sweep of any node, since the
    /// expired lease row stays until the node's last job is freed. Another node may win the
    /// race for a node; it is then not listed.
    pub async fn take_over(&mut self) -> Result<Vec<Takeover>> {
        let expired = self.sql("SELECT id FROM {t}_leases WHERE lease_until < {now}");
        let dead: sqlx::Result<Vec<i64>> = {
            let conn = self.conn().await?;
            per_backend!(Conn, conn, c, DB => sqlx::query_scalar::<DB, i64>(&expired).fetch_all(c).await)
        };
        let dead = dead.map_err(|e| self.failed(e))?;
        let mut taken = Vec::new();
        for node in dead {
            if let Some(t) = self.retire(node as u64, true).await? {
                taken.push(t);
            }
        }
        Ok(taken)
    }

    /// Ends `node`'s incarnation at shutdown: its jobs become claimable at once and its rows
    /// go. Returns how many jobs it gave up.
    pub async fn leave(&mut self, node: u64) -> Result<u64> {
        Ok(self.retire(node, false).await?.map_or(0, |t| t.jobs))
    }

    /// Retires `node` (if `expired`, only while its lease has ended): see
    /// [`ClusterDb::take_over`]. `None` if there was nothing to do.
    async fn retire(&mut self, node: u64, expired: bool) -> Result<Option<Takeover>> {
        let lock = self.sql(if expired {
            "SELECT id FROM {t}_leases WHERE id = ? AND lease_until < {now} FOR UPDATE"
        } else {
            "SELECT id FROM {t}_leases WHERE id = ? FOR UPDATE"
        });
        let address = self.sql("SELECT address FROM {t}_nodes WHERE id = ?");
        let delete_node = self.sql("DELETE FROM {t}_nodes WHERE id = ?");
        let delete_lease = self.sql("DELETE FROM {t}_leases WHERE id = ?");
        // Ended for good: a renewal waiting for the lock checks its condition again on the
        // changed row, and fails (a row only locked would let it through).
        let end_lease = self.sql(match self.kind() {
            Kind::MySql => "UPDATE {t}_leases SET lease_until = '1970-01-01 00:00:01' WHERE id = ?",
            Kind::Postgres => "UPDATE {t}_leases SET lease_until = TIMESTAMPTZ '1970-01-01 00:00:00+00' WHERE id = ?",
        });
        let free = match self.kind() {
            Kind::MySql => self.sql(&format!(
                "UPDATE {{t}} SET owner = NULL, running = 0 WHERE owner = ? ORDER BY seq LIMIT {FREE_CHUNK}"
            )),
            Kind::Postgres => self.sql(&format!(
                "UPDATE {{t}} SET owner = NULL, running = 0 WHERE seq IN \
                 (SELECT seq FROM {{t}} WHERE owner = ? LIMIT {FREE_CHUNK} FOR UPDATE SKIP LOCKED)"
            )),
        };
        let owned = self.sql("SELECT seq FROM {t} WHERE owner = ? LIMIT 1");
        let notify = format!("SELECT pg_notify('{}', '')", channel(self.table()));
        let node = node as i64;
        let conn = self.conn().await?;
        let outcome: sqlx::Result<Option<Takeover>> = async {
            let retired: Option<Option<String>> = {
                let mut tx = per_backend!(Conn, &mut *conn, c, _DB => c.begin().await.map(Tx::from))?;
                let found = per_backend!(Tx, &mut tx, t, DB => {
                    sqlx::query_scalar::<DB, i64>(&lock).bind(node).fetch_optional(&mut **t).await
                })?;
                match found {
                    None => None,
                    Some(_) => {
                        let address = per_backend!(Tx, &mut tx, t, DB => {
                            sqlx::query_scalar::<DB, String>(&address).bind(node).fetch_optional(&mut **t).await
                        })?;
                        for sql in [&end_lease, &delete_node] {
                            per_backend!(Tx, &mut tx, t, DB => {
                                sqlx::query::<DB>(sql).bind(node).execute(&mut **t).await.map(drop)
                            })?;
                        }
                        per_backend!(Tx, tx, t, _DB => t.commit().await)?;
                        Some(address)
                    }
                }
            };
            let Some(address) = retired else { return Ok(None) };
            let mut jobs = 0;
            loop {
                let freed = per_backend!(Conn, &mut *conn, c, DB => {
                    sqlx::query::<DB>(&free).bind(node).execute(&mut *c).await.map(|r| r.rows_affected())
                })?;
                if freed > 0 {
                    if let Conn::Postgres(c) = &mut *conn {
                        sqlx::query(&notify).execute(&mut *c).await?;
                    }
                }
                jobs += freed;
                if freed == 0 {
                    break;
                }
            }
            // Rows another sweeper is freeing right now were skipped: the lease row stays until
            // none is left, so a takeover cut short is always resumed.
            let left = per_backend!(Conn, &mut *conn, c, DB => {
                sqlx::query_scalar::<DB, i64>(&owned).bind(node).fetch_optional(&mut *c).await
            })?;
            if left.is_none() {
                per_backend!(Conn, &mut *conn, c, DB => sqlx::query::<DB>(&delete_lease).bind(node).execute(&mut *c).await.map(drop))?;
            }
            Ok(Some(Takeover { node: node as u64, resumed: address.is_none(), address: address.unwrap_or_default(), jobs }))
        }
        .await;
        outcome.map_err(|e| self.failed(e))
    }

    /// Every node's row, oldest incarnation first.
    pub async fn nodes(&mut self) -> Result<Vec<NodeRow>> {
        let sql = self.sql(match self.kind() {
            Kind::MySql => {
                "SELECT n.id, n.address, TIMESTAMPDIFF(MICROSECOND, l.renewed_at, {now}), \
                 TIMESTAMPDIFF(MICROSECOND, {now}, l.lease_until), l.info \
                 FROM {t}_nodes n JOIN {t}_leases l ON l.id = n.id ORDER BY n.id"
            }
            Kind::Postgres => {
                "SELECT n.id, n.address, (EXTRACT(EPOCH FROM ({now} - l.renewed_at)) * 1000000)::BIGINT, \
                 (EXTRACT(EPOCH FROM (l.lease_until - {now})) * 1000000)::BIGINT, l.info \
                 FROM {t}_nodes n JOIN {t}_leases l ON l.id = n.id ORDER BY n.id"
            }
        });
        let conn = self.conn().await?;
        let rows = per_backend!(Conn, conn, c, DB => {
            sqlx::query_as::<DB, (i64, String, i64, i64, String)>(&sql).fetch_all(c).await
        });
        let rows = rows.map_err(|e| self.failed(e))?;
        Ok(rows
            .into_iter()
            .map(|(id, address, ago, left, info)| NodeRow {
                id: id as u64,
                address,
                renewed_ago: Duration::from_micros(ago.max(0) as u64),
                lease_left_micros: left,
                info,
            })
            .collect())
    }

    /// Unowned jobs per function: queued for any node to claim.
    pub async fn unowned(&mut self) -> Result<Vec<(Vec<u8>, u64)>> {
        let sql = self.sql("SELECT function_name, COUNT(*) FROM {t} WHERE owner IS NULL GROUP BY function_name");
        let conn = self.conn().await?;
        let rows = per_backend!(Conn, conn, c, DB => sqlx::query_as::<DB, (Vec<u8>, i64)>(&sql).fetch_all(c).await);
        let rows = rows.map_err(|e| self.failed(e))?;
        Ok(rows.into_iter().map(|(f, n)| (f, n as u64)).collect())
    }

    /// Makes up to `limit` unowned jobs of `function` that are due at `now` (Unix seconds)
    /// `node`'s, highest priority and oldest first, skipping rows another node is claiming,
    /// and appends them to `out`. `Ok(None)` if `node`'s lease has ended. The jobs go into
    /// `out` just before the COMMIT: if that fails or is abandoned (the claim may have landed),
    /// they are there, and the caller runs them rather than leave rows it may own unserved.
    pub async fn claim(
        &mut self,
        node: u64,
        function: &[u8],
        now: i64,
        limit: usize,
        out: &mut Vec<StoredJob>,
    ) -> Result<Option<usize>> {
        let fence = self.fence_sql();
        let select = self.sql(&format!(
            "SELECT seq, priority, run_at, function_name, unique_key, data, attempts FROM {{t}} \
             WHERE owner IS NULL AND function_name = ? AND run_at <= ? ORDER BY priority, created_at, seq \
             LIMIT {limit} FOR UPDATE SKIP LOCKED"
        ));
        let (kind, table) = (self.kind(), self.table().to_string());
        let conn = self.conn().await?;
        let outcome: sqlx::Result<Option<usize>> = async {
            let mut tx = per_backend!(Conn, &mut *conn, c, _DB => c.begin().await.map(Tx::from))?;
            if !fenced(&mut tx, &fence, node).await? {
                return Ok(None);
            }
            if let Tx::Postgres(t) = &mut tx {
                // The claim index hands rows over in claim order. With statistics from when the
                // table was small (autovacuum off or behind), the planner would rather sort
                // every unowned job of the function: a claim at depth would cost the depth.
                sqlx::query("SET LOCAL enable_sort = off").execute(&mut **t).await?;
            }
            // Kept apart until the COMMIT: a claim abandoned before it claimed nothing.
            let mut rows_read = Vec::new();
            per_backend!(Tx, &mut tx, t, DB => {
                let mut rows = sqlx::query::<DB>(&select).bind(function).bind(now).fetch(&mut **t);
                while let Some(row) = rows.try_next().await? {
                    let seq: i64 = row.try_get(0)?;
                    let priority: i16 = row.try_get(1)?;
                    let unique: Option<Vec<u8>> = row.try_get(4)?;
                    let attempts: i32 = row.try_get(6)?;
                    let job = StoredJob {
                        seq: seq as u64,
                        priority: priority.clamp(0, 2) as u8,
                        run_at: row.try_get(2)?,
                        function: row.try_get(3)?,
                        unique: unique.unwrap_or_default(),
                        data: row.try_get(5)?,
                        loc: Loc(seq as u64),
                        attempts: attempts.max(0) as u32,
                    };
                    rows_read.push(job);
                }
                Ok::<(), sqlx::Error>(())
            })?;
            let claimed = &rows_read;
            if !claimed.is_empty() {
                let mut sql = format!("UPDATE {} SET owner = ", super::store::by_seq(kind, &table));
                push_placeholders(&mut sql, kind, 1, 1);
                sql.push_str(" WHERE seq IN (");
                push_placeholders(&mut sql, kind, 2, claimed.len());
                sql.push(')');
                per_backend!(Tx, &mut tx, t, DB => {
                    let mut q = sqlx::query::<DB>(&sql).bind(node as i64);
                    for c in claimed {
                        q = q.bind(c.seq as i64);
                    }
                    q.execute(&mut **t).await.map(drop)
                })?;
            }
            let n = claimed.len();
            out.append(&mut rows_read);
            per_backend!(Tx, tx, t, _DB => t.commit().await)?;
            Ok(Some(n))
        }
        .await;
        outcome.map_err(|e| self.failed(e))
    }

    /// The job's row, if the cluster holds it.
    pub async fn status(&mut self, key: StatusKey<'_>) -> Result<Option<RowStatus>> {
        let sql = self.sql(match key {
            StatusKey::Seq(_) => "SELECT running, numerator, denominator FROM {t} WHERE seq = ?",
            StatusKey::Unique(_) => "SELECT running, numerator, denominator FROM {t} WHERE unique_key = ? LIMIT 1",
        });
        let conn = self.conn().await?;
        let row = per_backend!(Conn, conn, c, DB => {
            let q = sqlx::query_as::<DB, (i16, i64, i64)>(&sql);
            match key {
                StatusKey::Seq(seq) => q.bind(seq as i64).fetch_optional(c).await,
                StatusKey::Unique(u) => q.bind(u).fetch_optional(c).await,
            }
        });
        let row = row.map_err(|e| self.failed(e))?;
        Ok(row.map(|(running, n, d)| RowStatus {
            running: running != 0,
            numerator: n.clamp(0, u32::MAX as i64) as u32,
            denominator: d.clamp(0, u32::MAX as i64) as u32,
        }))
    }

    /// Cancels job `seq` if no node owns it yet (a node that owns a job cancels it itself).
    pub async fn cancel(&mut self, seq: u64) -> Result<Cancel> {
        let delete = self.sql("DELETE FROM {t} WHERE seq = ? AND owner IS NULL");
        let owner =
            self.sql("SELECT q.owner, n.address FROM {t} q LEFT JOIN {t}_nodes n ON n.id = q.owner WHERE q.seq = ?");
        let conn = self.conn().await?;
        let outcome: sqlx::Result<Cancel> = async {
            let gone = per_backend!(Conn, &mut *conn, c, DB => {
                sqlx::query::<DB>(&delete).bind(seq as i64).execute(&mut *c).await.map(|r| r.rows_affected())
            })?;
            if gone > 0 {
                return Ok(Cancel::Done);
            }
            let row = per_backend!(Conn, &mut *conn, c, DB => {
                sqlx::query_as::<DB, (Option<i64>, Option<String>)>(&owner).bind(seq as i64).fetch_optional(&mut *c).await
            })?;
            Ok(match row {
                Some((Some(node), address)) => Cancel::Owned { node: node as u64, address: address.unwrap_or_default() },
                // Claimed or freed between the two statements: as good as unknown to the asker.
                Some((None, _)) | None => Cancel::Unknown,
            })
        }
        .await;
        outcome.map_err(|e| self.failed(e))
    }

    /// Notifications of claimable jobs (PostgreSQL only; on MariaDB nodes poll).
    pub async fn listen(&self) -> Result<Option<Listener>> {
        if self.kind() != Kind::Postgres {
            return Ok(None);
        }
        let mut listener =
            sqlx::postgres::PgListener::connect(self.target.url.as_str()).await.map_err(|e| self.target.error(e))?;
        listener.listen(&channel(self.table())).await.map_err(|e| self.target.error(e))?;
        Ok(Some(Listener { inner: listener }))
    }

    /// The statements that lock a node's row against a takeover, then check its lease.
    pub(crate) fn fence_sql(&self) -> Fence {
        Fence {
            lock: self.sql(match self.kind() {
                Kind::MySql => "SELECT id FROM {t}_nodes WHERE id = ? LOCK IN SHARE MODE",
                Kind::Postgres => "SELECT id FROM {t}_nodes WHERE id = ? FOR KEY SHARE",
            }),
            lease: self.sql("SELECT id FROM {t}_leases WHERE id = ? AND lease_until > {now}"),
        }
    }
}

pub(crate) struct Fence {
    lock: String,
    lease: String,
}

/// Whether `node` holds its lease. Its node row is locked in share mode until `tx` ends, so a
/// takeover (which deletes that row first) waits for this transaction, and once a takeover
/// has happened the row is gone and every later write fails here.
pub(crate) async fn fenced(tx: &mut Tx<'_>, fence: &Fence, node: u64) -> sqlx::Result<bool> {
    for sql in [&fence.lock, &fence.lease] {
        let row = per_backend!(Tx, &mut *tx, t, DB => {
            sqlx::query_scalar::<DB, i64>(sql).bind(node as i64).fetch_optional(&mut **t).await
        })?;
        if row.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// PostgreSQL notifications of claimable jobs.
pub struct Listener {
    inner: sqlx::postgres::PgListener,
}

impl Listener {
    /// Waits for the next notification. After a lost connection it reconnects (and says so
    /// with `Ok`: notifications may have been missed, so the caller looks anyway).
    pub async fn next(&mut self) -> Result<()> {
        self.inner.try_recv().await.map(drop).map_err(|e| StoreError::Database(format!("listening: {e}")))
    }
}
