//! `waltail inspect FILE`: what one WAL segment file holds and where it ends.
//!
//! The figures are those `pg_waldump FILE` gives for the same single file:
//! `records` counts the records that start in the file and are complete and
//! valid within it, `last_record_lsn` is where the last of them starts, and
//! `end_lsn` is where the next record would start. A file may be a whole
//! segment or a prefix of one that is a whole number of 8 kB pages.

use std::fs::File;
use std::path::Path;

use serde::Serialize;

use crate::fsio::map_readonly;
use crate::wal::page::{PageHeader, SIZE_OF_LONG_PHD, XLP_LONG_HEADER};
use crate::wal::{
    scan_segment, Lsn, ScanConfig, SegmentName, SegmentSize, TimelineId, WalFileName, XLOG_BLCKSZ,
};

/// The report, with exactly the keys `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub segment: String,
    pub timeline: TimelineId,
    pub system_identifier: Option<String>,
    pub segment_size: u64,
    pub page_magic: String,
    pub pg_version: u32,
    pub records: u64,
    pub first_record_lsn: Option<Lsn>,
    pub last_record_lsn: Option<Lsn>,
    pub end_lsn: Lsn,
    pub end_reason: String,
    #[serde(skip)]
    pub end_detail: String,
}

/// Bad input: the message names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {what}")]
pub struct InspectError {
    pub file: String,
    pub what: String,
}

/// Reads the segment identity and size from the file's first page.
pub fn first_page_facts(bytes: &[u8]) -> Result<(PageHeader, SegmentSize), String> {
    if bytes.len() < SIZE_OF_LONG_PHD {
        return Err(format!(
            "not a WAL segment: {} bytes is too short for a segment header",
            bytes.len()
        ));
    }
    let hdr = PageHeader::parse(bytes, Lsn(0)).map_err(|e| e.to_string())?;
    if hdr.major_version().is_none() {
        return Err(format!(
            "not a WAL segment, or unsupported WAL version 0x{:04X} (waltail reads PostgreSQL 13 to 18)",
            hdr.magic
        ));
    }
    let Some(long) = hdr.long.filter(|_| hdr.info & XLP_LONG_HEADER != 0) else {
        return Err("not a WAL segment: the first page has no long header".into());
    };
    let seg = SegmentSize::new(u64::from(long.seg_size)).ok_or_else(|| {
        format!(
            "invalid WAL segment size {} in the segment header",
            long.seg_size
        )
    })?;
    if u64::from(long.xlog_blcksz) != XLOG_BLCKSZ {
        return Err(format!(
            "unsupported WAL block size {} (waltail reads 8192)",
            long.xlog_blcksz
        ));
    }
    Ok((hdr, seg))
}

/// Inspects the file at `path`.
pub fn inspect(path: &Path) -> Result<Report, InspectError> {
    let fail = |what: String| InspectError {
        file: path.display().to_string(),
        what,
    };
    let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(fail("not a WAL segment: the file is empty".into()));
    }
    let map = map_readonly(&file).map_err(|e| fail(format!("cannot read: {e}")))?;
    let bytes: &[u8] = &map;
    let (hdr, seg_size) = first_page_facts(bytes).map_err(fail)?;
    let len = bytes.len() as u64;
    if len > seg_size.bytes() || (len != seg_size.bytes() && len % XLOG_BLCKSZ != 0) {
        return Err(fail(format!(
            "wrong size: {len} bytes; a {seg_size} segment file has {} bytes, or a whole number of 8192-byte pages fewer",
            seg_size.bytes()
        )));
    }
    // The segment the file is meant to be comes from its name, as for
    // pg_waldump; a file with another name is taken at its first page's word.
    let base = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".partial").unwrap_or(n));
    let segment = match base.map(|b| WalFileName::parse(b, seg_size)) {
        Some(Ok(WalFileName::Segment(s))) => s,
        _ => SegmentName::of_lsn(hdr.tli, hdr.pageaddr, seg_size),
    };
    let seg_start = segment.start_lsn(seg_size);
    let s = scan_segment(seg_start, bytes, ScanConfig::new(seg_size));
    let long = hdr.long.expect("first_page_facts checked the long header");
    Ok(Report {
        segment: segment.file_name(seg_size),
        timeline: segment.tli,
        system_identifier: Some(long.sysid.to_string()),
        segment_size: seg_size.bytes(),
        page_magic: format!("0x{:04X}", hdr.magic),
        pg_version: hdr.major_version().unwrap_or(0),
        records: s.records,
        first_record_lsn: s.first_record,
        last_record_lsn: s.last_record,
        end_lsn: s.end_lsn,
        end_reason: s.end.kind.as_str().to_string(),
        end_detail: s.end.to_string(),
    })
}

impl Report {
    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let opt = |l: Option<Lsn>| l.map_or("-".to_string(), |l| l.to_string());
        format!(
            "segment:           {}\n\
             timeline:          {}\n\
             system identifier: {}\n\
             segment size:      {} bytes\n\
             page magic:        {} (PostgreSQL {})\n\
             records:           {}\n\
             first record:      {}\n\
             last record:       {}\n\
             end of WAL:        {}\n\
             end reason:        {}\n",
            self.segment,
            self.timeline,
            self.system_identifier.as_deref().unwrap_or("-"),
            self.segment_size,
            self.page_magic,
            self.pg_version,
            self.records,
            opt(self.first_record_lsn),
            opt(self.last_record_lsn),
            self.end_lsn,
            self.end_detail,
        )
    }
}
