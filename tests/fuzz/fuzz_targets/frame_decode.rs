//! `Frame::parse` on arbitrary bytes, and a `FrameReader` over the same
//! bytes delivered in arbitrary pieces.
//!
//! Input: `mode | chunk | bytes`. Mode bit 0 set: `bytes` are raw bodies
//! separated by `FE FE`, each framed with a correct length and checksum (so
//! the payload decoders are reached); else `bytes` go to the decoder as they
//! are. Mode bit 1 set: a small maximum frame size (from `chunk`).
//!
//! Properties: no panic; a parsed frame took at most the bytes given, every
//! shorter prefix is "need more", bytes after it do not change it, and it
//! re-encodes to the same bytes (except where the codec normalises: a
//! Welcome without a position, a Refuse reason that is not UTF-8), and the
//! re-encoding always parses back to the same frame; the reader yields exactly
//! the frames repeated `Frame::parse` does, then the same error or end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waltail::proto::frame::{Frame, MAX_FRAME};
use waltail::proto::{FrameReader, ProtoError};
use waltail_fuzz::{frame_body, runtime, split_bodies, Chunked};

fn normalises(f: &Frame, raw: &[u8]) -> bool {
    match f {
        Frame::Welcome { position: None } => true,
        Frame::Refuse { .. } => std::str::from_utf8(&raw[6..raw.len() - 4]).is_err(),
        _ => false,
    }
}

fn check_one(buf: &[u8], max: usize) -> Option<usize> {
    match Frame::parse(buf, max) {
        Ok(Some((f, n))) => {
            assert!(n >= 9 && n <= buf.len(), "took {n} of {} bytes", buf.len());
            let raw = &buf[..n];
            let mut enc = Vec::new();
            f.encode(&mut enc);
            if !normalises(&f, raw) {
                assert_eq!(enc, raw, "{f:?} re-encodes differently");
            }
            let (g, m) = Frame::parse(&enc, MAX_FRAME.max(max))
                .expect("a re-encoded frame parses")
                .expect("a re-encoded frame is complete");
            assert_eq!((g, m), (f.clone(), enc.len()));
            for cut in [0, 3, 4, 8, n / 2, n - 1] {
                assert_eq!(Frame::parse(&raw[..cut.min(n - 1)], max), Ok(None));
            }
            let mut longer = raw.to_vec();
            longer.extend_from_slice(&[0xAB; 5]);
            assert_eq!(Frame::parse(&longer, max), Ok(Some((f, n))));
            Some(n)
        }
        Ok(None) => {
            // Need more: only when the length says more than what is here.
            if buf.len() >= 4 {
                let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                assert!(len <= max && buf.len() < len + 8);
            }
            None
        }
        Err(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        let _ = Frame::parse(data, MAX_FRAME);
        return;
    }
    let (mode, chunk, rest) = (data[0], data[1], &data[2..]);
    let mut framed = Vec::new();
    let bytes = if mode & 1 != 0 {
        for b in split_bodies(rest) {
            frame_body(b, &mut framed);
        }
        &framed[..]
    } else {
        rest
    };
    let max = if mode & 2 != 0 {
        usize::from(chunk) * 4
    } else {
        MAX_FRAME
    };

    // Frame after frame, as a reader would see them.
    let mut expected = Vec::new();
    let mut at = 0;
    let tail = loop {
        let r = Frame::parse(&bytes[at..], max);
        match check_one(&bytes[at..], max) {
            Some(n) => {
                expected.push(r.unwrap().unwrap().0);
                at += n;
            }
            None => break r,
        }
    };

    if max != MAX_FRAME {
        return; // the reader always uses MAX_FRAME
    }
    let chunk = usize::from(chunk % 64) + 1;
    let got = runtime().block_on(async {
        let mut r = FrameReader::new(Chunked::new(bytes, chunk));
        let mut frames = Vec::new();
        let end = loop {
            match r.read_frame().await {
                Ok(Some(f)) => frames.push(f),
                other => break other,
            }
        };
        (frames, end)
    });
    assert_eq!(got.0, expected);
    match (tail, got.1) {
        (Ok(None), Ok(None)) => assert_eq!(at, bytes.len()),
        (Ok(None), Err(ProtoError::TruncatedFrame)) => assert!(at < bytes.len()),
        (Err(e), Err(ProtoError::Frame(g))) => assert_eq!(e, g),
        (t, g) => panic!("parse ended with {t:?}, the reader with {g:?}"),
    }
});
