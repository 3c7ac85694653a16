//! Helpers shared by the fuzz targets: a runtime, a byte source that hands
//! out its bytes in small pieces, framing of raw bodies, and the real WAL
//! fixtures.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use waltail::wal::{Lsn, SegmentSize, WalFileName};

/// One current-thread runtime for every input (building one per input would
/// dominate the run time).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime")
    })
}

/// An `AsyncRead` over a byte slice that returns at most `chunk` bytes per
/// read, so that frames arrive split at arbitrary points; EOF at the end.
pub struct Chunked<'a> {
    bytes: &'a [u8],
    chunk: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(bytes: &'a [u8], chunk: usize) -> Self {
        Chunked {
            bytes,
            chunk: chunk.max(1),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.bytes.len().min(self.chunk).min(buf.remaining());
        let (a, rest) = self.bytes.split_at(n);
        buf.put_slice(a);
        self.bytes = rest;
        Poll::Ready(Ok(()))
    }
}

/// `length | body | crc` around a raw body, as the codec frames it: lets a
/// target get past the checksum and reach the payload decoders.
pub fn frame_body(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
}

/// Splits `data` into bodies at each `sep` byte pair `0xFE 0xFE` (a cheap,
/// fuzzer-friendly way to describe several frames in one input).
pub fn split_bodies(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut from = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xFE && data[i + 1] == 0xFE {
            out.push(&data[from..i]);
            i += 2;
            from = i;
        } else {
            i += 1;
        }
    }
    out.push(&data[from..]);
    out
}

pub fn seg1() -> SegmentSize {
    SegmentSize::new(1 << 20).expect("1 MB is a valid segment size")
}

/// (segment start, bytes) of the real PostgreSQL 15 fixtures that hold
/// records (fixtures/pg15/<kind>/<segment>.gz, 1 MB segments), loaded once.
pub fn fixtures() -> &'static [(Lsn, Vec<u8>)] {
    static F: OnceLock<Vec<(Lsn, Vec<u8>)>> = OnceLock::new();
    F.get_or_init(|| {
        use std::io::Read;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pg15");
        let mut paths = Vec::new();
        for kind in std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .flatten()
        {
            if kind.file_name() == "recycled" {
                continue;
            }
            for f in std::fs::read_dir(kind.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "gz") {
                    paths.push(p);
                }
            }
        }
        paths.sort();
        let out: Vec<_> = paths
            .iter()
            .map(|p| {
                let name = p.file_stem().unwrap().to_string_lossy().to_string();
                let start = match WalFileName::parse(&name, seg1()) {
                    Ok(WalFileName::Segment(s)) => s.start_lsn(seg1()),
                    other => panic!("fixture name {name}: {other:?}"),
                };
                let mut bytes = Vec::new();
                flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
                    .read_to_end(&mut bytes)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                (start, bytes)
            })
            .collect();
        assert!(!out.is_empty(), "no fixtures under {}", root.display());
        out
    })
}
