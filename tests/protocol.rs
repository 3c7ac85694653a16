//! The receiver against a hand-driven peer speaking the wire protocol:
//! bad frames close the connection with nothing written, a second shipper is
//! refused while one streams.

use std::time::Duration;

use crate::util::*;
use waltail::proto::conn::client_auth;
use waltail::proto::{Frame, FrameReader, FrameWriter, Hello, ProtoError, RefuseCode, Secret};
use waltail::wal::{Lsn, TimelineId};

const SECRET: &str = "test-secret-0123456789abcdef";

type Peer = (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
);

async fn peer(addr: &str, sysid: u64) -> Result<(Peer, Option<(TimelineId, Lsn)>), ProtoError> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    let (r, w) = s.into_split();
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    client_auth(&mut r, &mut w, &Secret::from_bytes(SECRET.as_bytes())).await?;
    w.send(&Frame::Hello(Hello {
        sysid,
        tli: TimelineId(1),
        seg_size: 1 << 20,
        pg_version: 150000,
        flush: Lsn(0x100_0000),
    }))
    .await?;
    match r.expect(Duration::from_secs(10), "Welcome").await? {
        Frame::Welcome { position } => Ok(((r, w), position)),
        other => panic!("got {other:?}"),
    }
}

#[test]
fn bad_frames_close_the_connection_and_nothing_of_them_is_written() {
    let w = Workdir::new();
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A good frame first: written and acked.
        let ((mut r, mut wr), pos) = peer(&addr, 42).await.unwrap();
        assert_eq!(pos, None);
        let data = vec![7u8; 1000];
        wr.send(&Frame::Data {
            tli: TimelineId(1),
            start: Lsn(0x100_0000),
            bytes: data.clone(),
        })
        .await
        .unwrap();
        match r.expect(Duration::from_secs(10), "Ack").await.unwrap() {
            Frame::Ack { durable, .. } => assert_eq!(durable, Lsn(0x100_0000 + 1000)),
            other => panic!("{other:?}"),
        }
        // A second shipper of the same cluster is refused while this one streams.
        match peer(&addr, 42).await {
            Err(ProtoError::Refused { code, reason }) => {
                assert_eq!(code, RefuseCode::Busy, "{reason}")
            }
            other => panic!("second shipper: {:?}", other.map(|x| x.1)),
        }
        // A Data frame whose checksum is wrong: the connection closes.
        let mut bytes = Vec::new();
        Frame::Data {
            tli: TimelineId(1),
            start: Lsn(0x100_0000 + 1000),
            bytes: vec![9u8; 500],
        }
        .encode(&mut bytes);
        let n = bytes.len();
        bytes[n - 10] ^= 0xFF;
        let mut raw = wr;
        raw.send_raw(&bytes).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), r.read_frame())
            .await
            .unwrap();
        assert!(
            matches!(end, Ok(None) | Ok(Some(Frame::Refuse { .. })) | Err(_)),
            "{end:?}"
        );
    });
    assert_eq!(
        spool_position(&spool),
        Some((TimelineId(1), Lsn(0x100_0000 + 1000)))
    );
    let part = std::fs::read(spool.join("000000010000000000000010.partial")).unwrap();
    assert!(part[..1000].iter().all(|&b| b == 7));
    assert!(
        part[1000..].iter().all(|&b| b == 0),
        "bytes of the corrupt frame were written"
    );
    rx.wait_log(&["checksum"], 10);
    // A frame over the maximum and an unknown type are refused the same way.
    rt.block_on(async {
        for body in [vec![200u8, 1, 2, 3], vec![7u8; 0]] {
            let ((mut r, wr), _) = peer(&addr, 42).await.unwrap();
            let mut bytes = Vec::new();
            if body.is_empty() {
                bytes.extend_from_slice(&(64u32 << 20).to_le_bytes());
            } else {
                bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&body);
                bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            }
            let mut raw = wr;
            raw.send_raw(&bytes).await.unwrap();
            let end = tokio::time::timeout(Duration::from_secs(10), r.read_frame())
                .await
                .unwrap();
            assert!(
                matches!(end, Ok(None) | Ok(Some(Frame::Refuse { .. })) | Err(_)),
                "{end:?}"
            );
        }
    });
    assert_eq!(
        spool_position(&spool),
        Some((TimelineId(1), Lsn(0x100_0000 + 1000)))
    );
    rx.wait_log(&["unknown frame type 200", "over the maximum"], 10);
}
