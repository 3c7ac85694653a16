//! The frame codec and the spool write path.
//!
//!     cargo bench --bench codec
//!
//! * encoding and decoding 1 MB Data frames (crc32fast over the body);
//! * the receiver's write path: 1 MB ranges written into a spool segment,
//!   without and with the fdatasync an ack waits for.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use waltail::proto::frame::{encode_data, Frame, MAX_FRAME};
use waltail::spool::writer::SpoolWriter;
use waltail::spool::Spool;
use waltail::wal::{Lsn, SegmentSize, TimelineId};

fn codec(c: &mut Criterion) {
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut g = c.benchmark_group("frame_1mb");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let mut buf = Vec::with_capacity(2 << 20);
    g.bench_function("encode_data", |b| {
        b.iter(|| {
            buf.clear();
            encode_data(TimelineId(1), Lsn(0x100_0000), &data, &mut buf);
            buf.len()
        })
    });
    let mut enc = Vec::new();
    encode_data(TimelineId(1), Lsn(0x100_0000), &data, &mut enc);
    g.bench_function("parse", |b| {
        b.iter(|| match Frame::parse(&enc, MAX_FRAME) {
            Ok(Some((_, n))) => n,
            other => panic!("{other:?}"),
        })
    });
    g.finish();
}

fn spool_write(c: &mut Criterion) {
    let seg = SegmentSize::new(64 << 20).unwrap();
    let data = vec![0x5Au8; 1 << 20];
    let mut g = c.benchmark_group("spool_write_1mb");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(20);
    for sync in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::open(Spool::create(dir.path()).unwrap(), seg).unwrap();
        w.start_at(TimelineId(1), Lsn(0)).unwrap();
        let mut at = Lsn(0);
        g.bench_function(if sync { "write_and_fdatasync" } else { "write" }, |b| {
            b.iter(|| {
                w.write(TimelineId(1), at, &data).unwrap();
                at = Lsn(at.0 + data.len() as u64);
                if sync {
                    w.sync().unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, spool_write);
criterion_main!(benches);
