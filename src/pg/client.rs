//! Talking to a running server with tokio-postgres: connecting from a
//! conninfo string (or the PG* environment variables), and the few facts
//! waltail asks a server for.

use anyhow::{Context, Result};
use tokio_postgres::{Client, NoTls};

use crate::wal::{Lsn, SegmentName, SegmentSize, TimelineId, WalFileName};

/// Connects; the connection task runs in the background until the client drops.
pub async fn connect(conninfo: &str) -> Result<Client> {
    let cfg = conninfo_with_env(conninfo);
    let (client, conn) = tokio_postgres::connect(&cfg, NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL ({})", redact(&cfg)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// libpq-style defaults from PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD
/// for keys the conninfo does not set.
pub fn conninfo_with_env(conninfo: &str) -> String {
    let mut s = conninfo.trim().to_string();
    for (key, var) in [
        ("host", "PGHOST"),
        ("port", "PGPORT"),
        ("user", "PGUSER"),
        ("dbname", "PGDATABASE"),
        ("password", "PGPASSWORD"),
    ] {
        let has = s
            .split_whitespace()
            .any(|kv| kv.split('=').next().map(str::trim) == Some(key));
        if !has {
            if let Ok(v) = std::env::var(var) {
                s.push_str(&format!(
                    " {key}='{}'",
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
    }
    s.trim().to_string()
}

/// The conninfo without its password, for messages.
pub fn redact(conninfo: &str) -> String {
    conninfo
        .split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What waltail needs to know about a server.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub sysid: u64,
    pub seg_size: SegmentSize,
    /// `server_version_num`, e.g. 150018.
    pub version_num: u32,
    pub data_directory: String,
    pub in_recovery: bool,
}

impl ServerInfo {
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }
}

pub async fn server_info(c: &Client) -> Result<ServerInfo> {
    let row = c
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text,
                    current_setting('wal_segment_size'),
                    current_setting('server_version_num')::int,
                    current_setting('data_directory'),
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .context("reading the server's identity (system identifier, wal_segment_size, data_directory; needs superuser or pg_read_all_settings and pg_monitor)")?;
    let sysid: String = row.get(0);
    let seg: String = row.get(1);
    let version: i32 = row.get(2);
    Ok(ServerInfo {
        sysid: sysid.parse().context("system identifier")?,
        seg_size: parse_size(&seg)
            .and_then(SegmentSize::new)
            .with_context(|| format!("wal_segment_size {seg:?}"))?,
        version_num: version as u32,
        data_directory: row.get(3),
        in_recovery: row.get(4),
    })
}

/// Parses "16MB", "1GB", "16777216" into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("GB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("kB") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// The flushed end of WAL, with what `pg_walfile_name_offset` says of it.
#[derive(Clone, Debug)]
pub struct FlushPoint {
    pub lsn: Lsn,
    pub file_name: String,
    pub file_offset: u64,
}

impl FlushPoint {
    /// A flush position learned elsewhere (a walsender's report) on
    /// timeline `tli`: named as the segment that holds the byte at `lsn`.
    pub fn on_timeline(tli: TimelineId, lsn: Lsn, seg_size: SegmentSize) -> FlushPoint {
        FlushPoint {
            lsn,
            file_name: SegmentName::of_lsn(tli, lsn, seg_size).file_name(seg_size),
            file_offset: lsn.segment_offset(seg_size),
        }
    }

    /// The timeline WAL is being written on, from the file name the server
    /// gave; None when that is not a segment name.
    pub fn timeline(&self, seg_size: SegmentSize) -> Option<TimelineId> {
        timeline_of(&self.file_name, seg_size)
    }
}

/// The timeline in a segment file name that came from the server (checked:
/// a reply is input like any other).
pub fn timeline_of(file_name: &str, seg_size: SegmentSize) -> Option<TimelineId> {
    match WalFileName::parse(file_name, seg_size) {
        Ok(w @ WalFileName::Segment(_)) => Some(w.timeline()),
        _ => None,
    }
}

/// The poll: `pg_walfile_name_offset(pg_current_wal_flush_lsn())`, with the LSN.
pub const FLUSH_POINT_SQL: &str = "SELECT l::text, n.file_name, n.file_offset
       FROM pg_current_wal_flush_lsn() l, pg_walfile_name_offset(l) n";

/// Polls the flush point with a statement prepared once ([`FLUSH_POINT_SQL`]).
pub async fn flush_point(c: &Client, stmt: &tokio_postgres::Statement) -> Result<FlushPoint> {
    let row = c
        .query_one(stmt, &[])
        .await
        .context("polling pg_walfile_name_offset(pg_current_wal_flush_lsn())")?;
    let lsn: String = row.get(0);
    let off: i32 = row.get(2);
    Ok(FlushPoint {
        lsn: lsn.parse()?,
        file_name: row.get(1),
        file_offset: off.max(0) as u64,
    })
}

/// The poll with the server's insert position as well:
/// `pg_current_wal_insert_lsn()` is where WAL records have been inserted
/// into the WAL buffers; ahead of the flush position, WAL is on its way to
/// disk (being written and fdatasynced, or waiting for the walwriter). The
/// write position would not do: XLogWrite (PostgreSQL 15 at least) publishes it together
/// with the flush position, after the fdatasync. The flush position is read
/// first, so the insert position is never behind it.
pub const WAL_POINT_SQL: &str =
    "SELECT l::text, n.file_name, n.file_offset, pg_current_wal_insert_lsn()::text
       FROM pg_current_wal_flush_lsn() l, pg_walfile_name_offset(l) n";

/// Polls the flush point and the insert position with a statement prepared
/// once ([`WAL_POINT_SQL`]).
pub async fn wal_point(c: &Client, stmt: &tokio_postgres::Statement) -> Result<(FlushPoint, Lsn)> {
    let row = c
        .query_one(stmt, &[])
        .await
        .context("polling pg_walfile_name_offset(pg_current_wal_flush_lsn())")?;
    let lsn: String = row.get(0);
    let off: i32 = row.get(2);
    let inserted: String = row.get(3);
    let fp = FlushPoint {
        lsn: lsn.parse()?,
        file_name: row.get(1),
        file_offset: off.max(0) as u64,
    };
    let inserted: Lsn = inserted.parse()?;
    Ok((fp.clone(), inserted.max(fp.lsn)))
}

pub async fn current_lsn(c: &Client) -> Result<Lsn> {
    let row = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    let s: String = row.get(0);
    Ok(s.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timelines_come_only_from_well_formed_segment_names() {
        let s16 = SegmentSize::DEFAULT;
        assert_eq!(
            timeline_of("0000000A0000000000000003", s16),
            Some(TimelineId(10))
        );
        for bad in [
            "",
            "0000",
            "+0000001000000000000000003",
            "0000000a0000000000000003",
            "0000000A.history",
            "é0000000000000000000000",
        ] {
            assert_eq!(timeline_of(bad, s16), None, "{bad:?}");
        }
        let fp = FlushPoint {
            lsn: Lsn(0),
            file_name: "0000".into(),
            file_offset: 0,
        };
        assert_eq!(fp.timeline(s16), None);
    }

    #[test]
    fn sizes_and_conninfo() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(redact("host=a password=secret"), "host=a password=***");
    }
}
