//! A batch as SQL statements: multi-row INSERTs and a `DELETE … WHERE seq IN (…)`, chunked
//! under the protocols' 65,535 bind parameters and a statement size (MySQL's
//! `max_allowed_packet`), with placeholders in each backend's syntax.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::ops::Range;

use crate::sql_conn::Kind;
use crate::{AddView, Batch, Result, StoreError};

/// Both protocols count a statement's bind parameters in 16 bits.
pub(crate) const MAX_PARAMS: usize = 65_535;
/// Bind parameters per added job.
pub(crate) const ADD_PARAMS: usize = 6;
/// Room for a row's framing in a statement, beyond its payload.
pub(crate) const ROW_OVERHEAD: usize = 64;

/// A batch as the statements carry it: jobs both added and removed in it are left out.
pub(crate) struct Plan<'a> {
    pub(crate) adds: Vec<AddView<'a>>,
    /// Ranges of `adds` that go into one INSERT each.
    pub(crate) add_chunks: Vec<Range<usize>>,
    pub(crate) removes: Vec<i64>,
    /// Retried jobs: sequence number, run_at, attempts (see [`crate::RetryView`]).
    pub(crate) retries: Vec<(i64, i64, i32)>,
}

impl<'a> Plan<'a> {
    pub(crate) fn new(batch: &'a Batch, statement_bytes: usize, max_job_bytes: usize) -> Result<Plan<'a>> {
        Plan::with_rows(batch, statement_bytes, max_job_bytes, ADD_PARAMS, false)
    }

    /// As [`Plan::new`], for rows of `params_per_row` bind parameters; `by_key` orders the
    /// adds by function and unique key, so that servers inserting the same keys at once lock
    /// them in the same order (and never deadlock each other).
    pub(crate) fn with_rows(
        batch: &'a Batch,
        statement_bytes: usize,
        max_job_bytes: usize,
        params_per_row: usize,
        by_key: bool,
    ) -> Result<Plan<'a>> {
        let seq_param = |seq: u64| {
            i64::try_from(seq).map_err(|_| StoreError::Database(format!("sequence number {seq} does not fit a BIGINT")))
        };
        let (adds, removes): (Vec<AddView<'a>>, Vec<u64>) = if batch.removes().is_empty() || batch.adds().len() == 0 {
            (batch.adds().collect(), batch.removes().iter().map(|&(seq, _)| seq).collect())
        } else {
            let removed: HashSet<u64> = batch.removes().iter().map(|&(seq, _)| seq).collect();
            let added: HashSet<u64> = batch.adds().map(|a| a.seq).collect();
            (
                batch.adds().filter(|a| !removed.contains(&a.seq)).collect(),
                batch.removes().iter().map(|&(seq, _)| seq).filter(|seq| !added.contains(seq)).collect(),
            )
        };
        let mut adds = adds;
        if by_key {
            adds.sort_by(|a, b| (a.function, a.unique).cmp(&(b.function, b.unique)));
        }
        let rows_per_insert = MAX_PARAMS / params_per_row;
        let mut add_chunks = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, add) in adds.iter().enumerate() {
            seq_param(add.seq)?;
            let size = ROW_OVERHEAD + add.function.len() + add.unique.len() + add.data.len();
            if size > max_job_bytes {
                return Err(StoreError::Database(format!(
                    "job {} of {size} bytes exceeds the database's packet limit of {max_job_bytes}",
                    add.seq
                )));
            }
            if i > start && (i - start == rows_per_insert || bytes + size > statement_bytes) {
                add_chunks.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        if start < adds.len() {
            add_chunks.push(start..adds.len());
        }
        let removes = removes.into_iter().map(seq_param).collect::<Result<_>>()?;
        let retries = batch
            .retries()
            .map(|r| Ok((seq_param(r.job.seq)?, r.job.run_at, i32::try_from(r.attempts).unwrap_or(i32::MAX))))
            .collect::<Result<_>>()?;
        Ok(Plan { adds, add_chunks, removes, retries })
    }
}

/// `n` placeholders from the `first`-th (1-based) on: `?, ?` or `$3, $4`.
pub(crate) fn push_placeholders(sql: &mut String, kind: Kind, first: usize, n: usize) {
    for i in first..first + n {
        if i > first {
            sql.push_str(", ");
        }
        match kind {
            Kind::MySql => sql.push('?'),
            Kind::Postgres => {
                let _ = write!(sql, "${i}");
            }
        }
    }
}

pub(crate) fn insert_sql(kind: Kind, table: &str, rows: usize, idempotent: bool) -> String {
    let mut sql = format!("INSERT INTO {table} (seq, priority, run_at, function_name, unique_key, data) VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        push_placeholders(&mut sql, kind, row * ADD_PARAMS + 1, ADD_PARAMS);
        sql.push(')');
    }
    // A retry after a COMMIT whose outcome was lost must not fail on the rows it did write.
    if idempotent {
        sql.push_str(match kind {
            Kind::MySql => " ON DUPLICATE KEY UPDATE seq = seq",
            Kind::Postgres => " ON CONFLICT (seq) DO NOTHING",
        });
    }
    sql
}

/// Sets a retried job's time and attempts.
pub(crate) fn retry_sql(kind: Kind, table: &str) -> String {
    match kind {
        Kind::MySql => format!("UPDATE {table} SET run_at = ?, attempts = ? WHERE seq = ?"),
        Kind::Postgres => format!("UPDATE {table} SET run_at = $1, attempts = $2 WHERE seq = $3"),
    }
}

pub(crate) fn delete_sql(kind: Kind, table: &str, n: usize) -> String {
    let mut sql = format!("DELETE FROM {table} WHERE seq IN (");
    push_placeholders(&mut sql, kind, 1, n);
    sql.push(')');
    sql
}

/// Reads the payloads of `n` jobs by sequence number.
pub(crate) fn select_data_sql(kind: Kind, table: &str, n: usize) -> String {
    let mut sql = format!("SELECT seq, data FROM {table} WHERE seq IN (");
    push_placeholders(&mut sql, kind, 1, n);
    sql.push(')');
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Loc;

    #[test]
    fn statements() {
        assert_eq!(
            insert_sql(Kind::Postgres, "q", 2, true),
            "INSERT INTO q (seq, priority, run_at, function_name, unique_key, data) \
             VALUES ($1, $2, $3, $4, $5, $6), ($7, $8, $9, $10, $11, $12) ON CONFLICT (seq) DO NOTHING"
        );
        assert!(insert_sql(Kind::MySql, "q", 1, false).ends_with("VALUES (?, ?, ?, ?, ?, ?)"));
        assert_eq!(delete_sql(Kind::MySql, "q", 3), "DELETE FROM q WHERE seq IN (?, ?, ?)");
        assert_eq!(select_data_sql(Kind::Postgres, "q", 2), "SELECT seq, data FROM q WHERE seq IN ($1, $2)");
        assert_eq!(delete_sql(Kind::Postgres, "q", 2), "DELETE FROM q WHERE seq IN ($1, $2)");
    }

    #[test]
    fn plan_skips_jobs_added_and_removed_together() {
        let mut b = Batch::default();
        b.push_add(1, 1, 0, b"f", b"", b"a");
        b.push_add(2, 1, 0, b"f", b"", b"b");
        b.push_remove(2, Loc::NONE);
        b.push_remove(0, Loc::NONE);
        let plan = Plan::new(&b, usize::MAX, usize::MAX).unwrap();
        assert_eq!(plan.adds.iter().map(|a| a.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(plan.add_chunks, vec![Range { start: 0, end: 1 }]);
        assert_eq!(plan.removes, [0]);
    }

    #[test]
    fn plan_chunks_by_parameters_and_bytes() {
        let mut b = Batch::default();
        let rows = MAX_PARAMS / ADD_PARAMS;
        for seq in 0..rows as u64 + 5 {
            b.push_add(seq, 1, 0, b"", b"", b"");
        }
        let plan = Plan::new(&b, usize::MAX, usize::MAX).unwrap();
        assert_eq!(plan.add_chunks, [0..rows, rows..rows + 5]);

        let mut b = Batch::default();
        for seq in 0..5 {
            b.push_add(seq, 1, 0, b"", b"", &[0; 1000 - ROW_OVERHEAD]);
        }
        let plan = Plan::new(&b, 2500, 1000).unwrap();
        assert_eq!(plan.add_chunks, [0..2, 2..4, 4..5]);
        assert!(matches!(Plan::new(&b, 2500, 999), Err(StoreError::Database(_))));

        let mut b = Batch::default();
        b.push_remove(u64::MAX, Loc::NONE);
        assert!(matches!(Plan::new(&b, 2500, 1000), Err(StoreError::Database(_))));
    }
}
