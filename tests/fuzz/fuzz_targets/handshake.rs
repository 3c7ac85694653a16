//! The authentication handshake fed hostile peer bytes.
//!
//! Input: `mode | chunk | bytes`, by `mode % 4`:
//! * 0: `server_auth` reads `bytes` as what the client sent;
//! * 1: `client_auth` reads `bytes` as what the server sent;
//! * 2: as 0, but `bytes` are raw bodies separated by `FE FE`, each framed
//!   with a correct length and checksum (reaches the payload checks);
//! * 3: a real `client_auth` holding the secret `bytes` talks to a real
//!   `server_auth` over an in-memory duplex.
//!
//! Properties: no panic, no hang (a tight timeout around every run), and
//! neither side ever accepts a peer that does not hold the same secret: with
//! replayed or forged bytes both sides must fail; over the duplex, both
//! succeed exactly when the client's secret is the server's.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use waltail::proto::conn::{client_auth, server_auth};
use waltail::proto::{FrameReader, FrameWriter, Secret};
use waltail_fuzz::{frame_body, runtime, split_bodies, Chunked};

const SECRET: &[u8] = b"fuzzing-shared-secret-0123456789";
const LIMIT: Duration = Duration::from_secs(2);

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (mode, chunk, rest) = (data[0] % 4, usize::from(data[1]) + 1, &data[2..]);
    let secret = Secret::from_bytes(SECRET);
    runtime().block_on(async {
        match mode {
            0..=2 => {
                let mut framed = Vec::new();
                let input = if mode == 2 {
                    for b in split_bodies(rest) {
                        frame_body(b, &mut framed);
                    }
                    &framed[..]
                } else {
                    rest
                };
                let mut r = FrameReader::new(Chunked::new(input, chunk));
                let mut w = FrameWriter::new(tokio::io::sink());
                let res = if mode == 1 {
                    tokio::time::timeout(LIMIT, client_auth(&mut r, &mut w, &secret)).await
                } else {
                    tokio::time::timeout(LIMIT, server_auth(&mut r, &mut w, &secret)).await
                };
                match res {
                    Err(_) => panic!("the handshake hung on bytes that end"),
                    Ok(Ok(())) => panic!("accepted a peer that replayed bytes without the secret"),
                    Ok(Err(_)) => {}
                }
            }
            _ => {
                let guess = Secret::from_bytes(rest);
                let (c, s) = tokio::io::duplex(chunk * 16);
                let (cr, cw) = tokio::io::split(c);
                let (sr, sw) = tokio::io::split(s);
                let client = async {
                    let (mut r, mut w) = (FrameReader::new(cr), FrameWriter::new(cw));
                    client_auth(&mut r, &mut w, &guess).await
                };
                let server = async {
                    let (mut r, mut w) = (FrameReader::new(sr), FrameWriter::new(sw));
                    let res = server_auth(&mut r, &mut w, &secret).await;
                    // Let a waiting client see the end of the stream.
                    w.shutdown().await;
                    res
                };
                let Ok((c, s)) =
                    tokio::time::timeout(LIMIT, async { tokio::join!(client, server) }).await
                else {
                    panic!("the handshake over a duplex hung");
                };
                let same = rest == SECRET;
                assert_eq!(s.is_ok(), same, "server: {s:?} with secret {rest:?}");
                assert_eq!(c.is_ok(), same, "client: {c:?} with secret {rest:?}");
            }
        }
    });
});
