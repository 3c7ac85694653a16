//! A write load that numbers its commits: what the demo, the benchmarks and
//! the failover tests use to tell exactly which commits a failover kept.
//!
//! Each commit inserts the next number into a table, one autocommit INSERT
//! at a time; a number is recorded as acknowledged only when COMMIT returned
//! to the client. With `track_lsn`, the client then asks for the insert LSN,
//! which is at or past the end of that commit's WAL: a commit whose LSN the
//! standby host had made durable must survive a failover.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::wal::Lsn;

#[derive(Clone, Copy, Debug)]
pub struct Acked {
    pub id: i64,
    /// An LSN at or past the end of this commit's WAL (when tracked).
    pub lsn_after: Option<Lsn>,
    /// When COMMIT returned, from the start of the load.
    pub at: Duration,
}

/// Creates the table the load writes to.
pub async fn create_table(conninfo: &str, table: &str) -> Result<()> {
    let c = crate::pg::client::connect(conninfo).await?;
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ))
    .await?;
    Ok(())
}

/// Inserts 1, 2, 3, ... until `stop`, `max` commits, `max_time`, or an error
/// (the primary died). Returns the acknowledged commits, in order.
pub async fn numbered_inserts(
    conninfo: &str,
    table: &str,
    stop: CancellationToken,
    max: i64,
    max_time: Duration,
    track_lsn: bool,
) -> Result<Vec<Acked>> {
    let c = crate::pg::client::connect(conninfo).await?;
    let ins = c
        .prepare(&format!("INSERT INTO {table} (id) VALUES ($1)"))
        .await?;
    let lsn = c
        .prepare("SELECT pg_current_wal_insert_lsn()::text")
        .await?;
    let t0 = Instant::now();
    let mut acked = Vec::new();
    for id in 1..=max {
        if stop.is_cancelled() || t0.elapsed() > max_time {
            break;
        }
        if c.execute(&ins, &[&id]).await.is_err() {
            break;
        }
        let at = t0.elapsed();
        let lsn_after = if track_lsn {
            match c.query_one(&lsn, &[]).await {
                Ok(r) => r.get::<_, String>(0).parse().ok(),
                Err(_) => {
                    acked.push(Acked {
                        id,
                        lsn_after: None,
                        at,
                    });
                    break;
                }
            }
        } else {
            None
        };
        acked.push(Acked { id, lsn_after, at });
    }
    Ok(acked)
}

/// The ids in `table`, ascending.
pub async fn ids(conninfo: &str, table: &str) -> Result<Vec<i64>> {
    let c = crate::pg::client::connect(conninfo).await?;
    let rows = c
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// True if `ids` is exactly 1..=n for some n (no gaps, no strays).
pub fn is_gap_free_prefix(ids: &[i64]) -> bool {
    ids.iter().enumerate().all(|(i, &id)| id == i as i64 + 1)
}
