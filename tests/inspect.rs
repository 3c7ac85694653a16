//! `waltail inspect` and the scanner agree with pg_waldump on real WAL:
//! every fixture, truncations, zeroed tails, stale pages and bit flips.

use std::path::{Path, PathBuf};

use crate::util::*;
use waltail::wal::{scan_segment, Lsn, ScanConfig, SegmentSize, XLOG_BLCKSZ};

fn lsn_field(v: &serde_json::Value, key: &str) -> Option<Lsn> {
    v[key].as_str().map(|s| s.parse().unwrap())
}

/// Writes `bytes` under the segment's own name in `dir` (pg_waldump needs it).
fn write_variant(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// inspect and pg_waldump agree on the file at `p`, or both find no record.
fn assert_agree(p: &Path, what: &str) -> Dump {
    let dump = waldump(p);
    match inspect_json(p) {
        Ok(v) => {
            assert_eq!(
                v["records"].as_u64().unwrap(),
                dump.records,
                "{what}: records"
            );
            assert_eq!(
                lsn_field(&v, "last_record_lsn"),
                dump.last,
                "{what}: last record"
            );
            assert_eq!(
                lsn_field(&v, "first_record_lsn"),
                dump.first,
                "{what}: first record"
            );
        }
        Err((stderr, code)) => {
            assert_eq!(code, 2, "{what}: {stderr}");
            assert_eq!(
                dump.records, 0,
                "{what}: inspect refused ({stderr}) but pg_waldump read records"
            );
        }
    }
    dump
}

#[test]
fn inspect_matches_recorded_pg_waldump_on_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = fixtures(15);
    let mut kinds = std::collections::BTreeSet::new();
    for f in &fixtures {
        let p = write_variant(dir.path(), &f.name, &f.bytes);
        let expected = parse_waldump(&f.waldump);
        let v = inspect_json(&p).unwrap_or_else(|e| panic!("{}/{}: {e:?}", f.kind, f.name));
        let what = format!("{}/{}", f.kind, f.name);
        assert_eq!(v["records"].as_u64().unwrap(), expected.records, "{what}");
        assert_eq!(lsn_field(&v, "last_record_lsn"), expected.last, "{what}");
        assert_eq!(lsn_field(&v, "first_record_lsn"), expected.first, "{what}");
        assert_eq!(v["segment"], f.name.as_str());
        assert_eq!(v["page_magic"], "0xD110");
        assert_eq!(v["pg_version"], 15);
        assert_eq!(v["segment_size"], 1 << 20);
        assert_eq!(v["timeline"], 1);
        assert!(
            v["system_identifier"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 0
        );
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 11, "exactly the documented keys, got {keys:?}");
        // And pg_waldump on this machine says the same as when the fixture was made.
        assert_eq!(waldump(&p), expected, "{what}: live pg_waldump");
        kinds.insert(f.kind.clone());
        // Where WAL ends and why, as a user reads it.
        let reason = v["end_reason"].as_str().unwrap().to_string();
        match f.kind.as_str() {
            "switch" => assert_eq!(reason, "switch", "{what}"),
            "recycled" => assert_eq!(reason, "stale_page", "{what}"),
            "live" => assert_eq!(reason, "zeroes", "{what}"),
            _ => {}
        }
    }
    for k in [
        "switch",
        "fpi",
        "span-pages",
        "span-segments",
        "recycled",
        "live",
    ] {
        assert!(kinds.contains(k), "fixture kind {k} missing");
    }
}

#[test]
fn fixtures_cover_records_spanning_pages_and_segments() {
    let span = fixtures(15)
        .into_iter()
        .filter(|f| f.kind == "span-segments")
        .collect::<Vec<_>>();
    assert!(
        span.len() >= 3,
        "the big record crosses at least two segment boundaries"
    );
    // The middle segment is all continuation: no record starts in it.
    assert!(span.iter().any(|f| parse_waldump(&f.waldump).records == 0));
    let seg = SegmentSize::new(1 << 20).unwrap();
    for f in &span {
        let start = waltail::wal::WalFileName::parse(&f.name, seg).unwrap();
        let waltail::wal::WalFileName::Segment(s) = start else {
            panic!()
        };
        let sum = scan_segment(s.start_lsn(seg), &f.bytes, ScanConfig::new(seg));
        assert_eq!(sum.records, parse_waldump(&f.waldump).records, "{}", f.name);
    }
}

#[test]
fn truncated_and_zero_tailed_segments_agree_with_pg_waldump() {
    let mut rng = Rng::new(seed());
    let dir = tempfile::tempdir().unwrap();
    for f in fixtures(15) {
        let pages = f.bytes.len() as u64 / XLOG_BLCKSZ;
        for _ in 0..4 {
            // A prefix of whole pages (pg_waldump reads whole pages).
            let n = (1 + rng.below(pages - 1)) * XLOG_BLCKSZ;
            let p = write_variant(dir.path(), &f.name, &f.bytes[..n as usize]);
            assert_agree(&p, &format!("{} truncated to {n}", f.name));
            // Full size, bytes past an arbitrary offset zeroed: a torn or partial copy.
            let cut = 64 + rng.below(f.bytes.len() as u64 - 64) as usize;
            let mut z = f.bytes.clone();
            z[cut..].fill(0);
            let p = write_variant(dir.path(), &f.name, &z);
            assert_agree(&p, &format!("{} zeroed from {cut}", f.name));
        }
    }
}

#[test]
fn recycled_file_partly_overwritten_stops_at_the_stale_page() {
    let fx = fixtures(15);
    let live = fx.iter().find(|f| f.kind == "live").unwrap();
    let old = fx.iter().find(|f| f.kind == "recycled").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump = parse_waldump(&live.waldump);
    let last = dump.last.unwrap();
    // The live fixture's written part, then the recycled file's old pages.
    let written_pages = (last.0 % (1 << 20)) / XLOG_BLCKSZ;
    for keep in [1, written_pages / 2, written_pages] {
        let mut b = old.bytes.clone();
        let n = (keep * XLOG_BLCKSZ) as usize;
        b[..n].copy_from_slice(&live.bytes[..n]);
        let p = write_variant(dir.path(), &live.name, &b);
        let d = assert_agree(&p, &format!("{} over recycled, {keep} pages", live.name));
        let v = inspect_json(&p).unwrap();
        if d.records > 0 && v["end_reason"] != "zeroes" {
            assert_eq!(v["end_reason"], "stale_page", "{keep} pages");
        }
    }
}

#[test]
fn bit_flips_agree_with_pg_waldump() {
    let mut rng = Rng::new(seed());
    let dir = tempfile::tempdir().unwrap();
    let mut stopped_early = 0;
    for f in fixtures(15) {
        let full = parse_waldump(&f.waldump);
        if full.records == 0 {
            continue;
        }
        let last = full.last.unwrap().0 % (1 << 20);
        for _ in 0..6 {
            let mut b = f.bytes.clone();
            let at = rng.below(last + 64) as usize;
            b[at] ^= 1 << rng.below(8);
            let p = write_variant(dir.path(), &f.name, &b);
            let d = assert_agree(&p, &format!("{} bit flip at {at}", f.name));
            if d.records < full.records {
                stopped_early += 1;
            }
        }
    }
    assert!(
        stopped_early > 0,
        "no bit flip stopped the scan: the flips missed the data"
    );
}

#[test]
fn inspect_reads_the_live_segment_of_a_running_server() {
    let c = small_cluster("inspect-live");
    c.psql("create table t(i int); insert into t select generate_series(1, 2000)")
        .unwrap();
    c.psql("select pg_logical_emit_message(true, 'x', repeat('z', 30000))")
        .unwrap();
    let name = c
        .psql("select pg_walfile_name(pg_current_wal_flush_lsn())")
        .unwrap();
    let flush: Lsn = c
        .psql("select pg_current_wal_flush_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(&name);
    std::fs::copy(c.pg_wal().join(&name), &copy).unwrap();
    // pg_waldump reads only its own version's WAL: where that one is
    // installed it is the judge; for every version the server is.
    if waldump_of(c.bin.major).is_some() {
        let d = assert_agree(&copy, "live segment");
        assert!(d.records > 0);
    }
    let v = inspect_json(&copy).unwrap();
    assert_server_identity(&c, &v);
    assert!(v["records"].as_u64().unwrap() > 0, "{v}");
    // All flushed WAL is complete, valid and found.
    assert!(
        lsn_field(&v, "end_lsn").unwrap() >= flush,
        "{v} vs flush {flush}"
    );
}

/// inspect names the version, system identifier and segment size the server reports.
fn assert_server_identity(c: &Cluster, v: &serde_json::Value) {
    let major = c.bin.major;
    assert_eq!(v["pg_version"], major, "{v}");
    let magic = waltail::wal::page::magic_of_major_version(major).unwrap();
    assert_eq!(v["page_magic"], format!("0x{magic:04X}"), "{v}");
    let version_num: u32 = c.psql("show server_version_num").unwrap().parse().unwrap();
    assert_eq!(version_num / 10000, major);
    let sysid = c
        .psql("select system_identifier from pg_control_system()")
        .unwrap();
    assert_eq!(v["system_identifier"], sysid.as_str(), "{v}");
    assert_eq!(v["segment_size"], 1 << 20, "{v}");
    assert_eq!(v["timeline"], 1, "{v}");
}

/// Records that start in `[from, to)` per pg_walinspect (15+): count, first, last.
fn walinspect(c: &Cluster, from: Lsn, to: Lsn) -> (u64, Option<Lsn>, Option<Lsn>) {
    let row = c
        .psql(&format!(
            "select count(*), min(start_lsn), max(start_lsn) \
               from pg_get_wal_records_info('{from}', least('{to}'::pg_lsn, pg_current_wal_flush_lsn())) \
              where start_lsn >= '{from}' and start_lsn < '{to}'"
        ))
        .unwrap();
    let f: Vec<&str> = row.split('|').collect();
    let lsn = |s: &str| (!s.is_empty()).then(|| s.parse::<Lsn>().unwrap());
    (f[0].parse().unwrap(), lsn(f[1]), lsn(f[2]))
}

/// Where a record starting at `start` with `len` bytes ends (short page
/// headers skipped), unaligned: what `pg_switch_wal()` returns for its record.
fn record_end(start: Lsn, len: u64) -> Lsn {
    let mut at = start.0;
    let mut left = len;
    while left > 0 {
        if at % XLOG_BLCKSZ == 0 {
            at += 24; // a short page header: the record does not begin a segment here
        }
        let room = XLOG_BLCKSZ - at % XLOG_BLCKSZ;
        let n = room.min(left);
        at += n;
        left -= n;
    }
    Lsn(at)
}

/// For the WAL of the server under test (any version, no pg_waldump of it
/// needed): a segment ended by `pg_switch_wal()` ends at the switch record
/// the server reports, with the records pg_walinspect lists (15+); after a
/// clean shutdown, the last record is the shutdown checkpoint the control
/// file points at.
#[test]
fn inspect_agrees_with_the_server_on_its_own_wal() {
    let mut c = small_cluster("inspect-server");
    let major = c.bin.major;
    if major >= 15 {
        c.psql("create extension pg_walinspect")
            .unwrap_or_else(|e| panic!("PostgreSQL {major} without pg_walinspect: {e:#}"));
    }
    let seg = SegmentSize::new(1 << 20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy_segment = |c: &Cluster, lsn: Lsn| {
        let name =
            waltail::wal::SegmentName::of_lsn(waltail::wal::TimelineId(1), lsn, seg).file_name(seg);
        let to = dir.path().join(&name);
        std::fs::copy(c.pg_wal().join(&name), &to).unwrap();
        to
    };
    c.psql("create table t(i int, v text)").unwrap();
    // Start in a fresh segment so that it holds only what follows.
    c.psql("select pg_switch_wal()").unwrap();
    c.psql("insert into t select g, repeat('v', 40) from generate_series(1, 3000) g")
        .unwrap();
    c.psql("select pg_logical_emit_message(true, 'x', repeat('z', 20000))")
        .unwrap();
    let switch_end: Lsn = c.psql("select pg_switch_wal()").unwrap().parse().unwrap();
    let p = copy_segment(&c, Lsn(switch_end.0 - 1));
    let v = inspect_json(&p).unwrap();
    assert_server_identity(&c, &v);
    assert_eq!(v["end_reason"], "switch", "{v}");
    let last = lsn_field(&v, "last_record_lsn").unwrap();
    assert_eq!(
        record_end(last, 24),
        switch_end,
        "the last record inspect finds is the switch record pg_switch_wal() wrote: {v}"
    );
    let seg_start = Lsn(switch_end.0 - switch_end.segment_offset(seg));
    let seg_end = Lsn(seg_start.0 + seg.bytes());
    assert_eq!(lsn_field(&v, "end_lsn").unwrap(), seg_end, "{v}");
    let records = v["records"].as_u64().unwrap();
    assert!(records > 3000, "{v}");
    if major >= 15 {
        assert_eq!(
            walinspect(&c, seg_start, seg_end),
            (
                records,
                lsn_field(&v, "first_record_lsn"),
                lsn_field(&v, "last_record_lsn")
            ),
            "pg_walinspect lists the records inspect counts"
        );
    }

    // A clean shutdown: its checkpoint is the last record.
    c.psql("insert into t values (1, 'last')").unwrap();
    let before_stop: Lsn = c
        .psql("select pg_current_wal_insert_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    c.stop().unwrap();
    let p = copy_segment(&c, before_stop);
    let v = inspect_json(&p).unwrap();
    c.start().unwrap();
    let (ckpt, redo): (Lsn, Lsn) = {
        let row = c
            .psql("select checkpoint_lsn, redo_lsn from pg_control_checkpoint()")
            .unwrap();
        let (a, b) = row.split_once('|').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    };
    assert_eq!(ckpt, redo, "a shutdown checkpoint is its own redo point");
    assert_eq!(
        lsn_field(&v, "last_record_lsn"),
        Some(ckpt),
        "the last record is the shutdown checkpoint: {v}"
    );
    let end = lsn_field(&v, "end_lsn").unwrap();
    assert!(end > ckpt, "{v}");
    let next: Lsn = c
        .psql("select pg_current_wal_insert_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        end <= next,
        "inspect's end {end} is past the server's insert position {next}"
    );
    if major >= 15 {
        let shutdown_seg = Lsn(before_stop.0 - before_stop.segment_offset(seg));
        let (n, first, last) = walinspect(&c, shutdown_seg, end);
        assert_eq!(
            (n, first, last),
            (
                v["records"].as_u64().unwrap(),
                lsn_field(&v, "first_record_lsn"),
                lsn_field(&v, "last_record_lsn")
            ),
            "pg_walinspect lists the records inspect counts, up to the checkpoint"
        );
    }
}

#[test]
fn bad_input_gets_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = &fixtures(15)[0];
    let cases: Vec<(PathBuf, &str)> = vec![
        (dir.path().join("missing"), "cannot open"),
        (dir.path().to_path_buf(), "not a regular file"),
        (write_variant(dir.path(), "empty", b""), "empty"),
        (
            write_variant(
                dir.path(),
                "text",
                b"this is not WAL at all, just some text\n",
            ),
            "not a WAL segment",
        ),
        (
            write_variant(dir.path(), "zeros", &vec![0u8; 1 << 20]),
            "not a WAL segment",
        ),
        (
            write_variant(dir.path(), "big", &[f.bytes.clone(), vec![0u8; 1]].concat()),
            "wrong size",
        ),
        (
            write_variant(dir.path(), "odd", &f.bytes[..12345]),
            "wrong size",
        ),
    ];
    for (p, expect) in cases {
        let out = waltail(&["inspect", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", p.display());
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(p.to_str().unwrap()), "names the file: {err}");
        assert!(err.contains(expect), "says {expect:?}: {err}");
        assert!(out.stdout.is_empty());
    }
    let mut b = f.bytes.clone();
    b[0] = 0x01; // magic 0xD101
    let p = write_variant(dir.path(), "oldversion", &b);
    let out = waltail(&["inspect", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported WAL version 0xD101"));
}

#[test]
fn inspect_text_output_names_everything() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures(15)
        .into_iter()
        .find(|f| f.kind == "switch")
        .unwrap();
    let p = write_variant(dir.path(), &f.name, &f.bytes);
    let out = waltail(&["inspect", p.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for k in [
        "segment:",
        "timeline:",
        "system identifier:",
        "page magic:",
        "PostgreSQL 15",
        "records:",
        "end reason:        switch",
    ] {
        assert!(text.contains(k), "{k} in {text}");
    }
}

#[test]
fn an_overwritten_contrecord_is_read_as_pg_waldump_reads_it() {
    use waltail::wal::synth::WalBuilder;
    let seg = SegmentSize::new(1 << 20).unwrap();
    let mut b = WalBuilder::new(Lsn(1 << 20), seg);
    b.fill(30_000, &[120, 700]);
    b.abandon_and_overwrite(12_000);
    b.fill(200_000, &[90, 5000]);
    b.zero_to_segment_end();
    let dir = tempfile::tempdir().unwrap();
    let p = write_variant(dir.path(), "000000010000000000000001", b.bytes());
    let d = assert_agree(&p, "synthetic segment with an overwritten contrecord");
    assert!(d.records > 50, "{d:?}");
}
