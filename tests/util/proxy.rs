//! A fault-injecting TCP proxy between a shipper and a receiver.
//!
//! It listens on a free loopback port and forwards every connection to the
//! receiver. The test changes its faults at run time through [`Proxy`]:
//! drop every connection (both sides closed), stall (nothing forwarded for a
//! while, connections stay open), delay each chunk, cut the shipper→receiver
//! stream in the middle of a frame (then close), flip one bit of a frame in
//! the shipper→receiver direction. What it injected is counted per kind
//! ([`Counts`]); [`Proxy::chaos`] drives a random mix from a seeded [`Rng`].
//!
//! The shipper→receiver direction is forwarded frame by frame (the length
//! prefix says where a frame ends), so a cut or a flip lands inside a known
//! frame: a flip changes a bit after the length prefix (type, payload or
//! checksum), which the receiver's checksum must catch. A stream that does
//! not look like frames (a length over 8 MB, or 0) is forwarded as it comes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Rng;

/// What the proxy injected, per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections accepted.
    pub connections: u64,
    /// Times the open connections were dropped (counted when there was at
    /// least one).
    pub drops: u64,
    /// Connections closed by those drops.
    pub dropped_connections: u64,
    /// Stalls started.
    pub stalls: u64,
    /// Delay periods started by [`Proxy::chaos`].
    pub delays: u64,
    /// Chunks forwarded late.
    pub delayed_chunks: u64,
    /// Frames cut in the middle (connection closed after the part).
    pub cuts: u64,
    /// Frames forwarded with one bit flipped.
    pub flips: u64,
    /// Connections that carried at least one flipped frame (the receiver
    /// closes at the first, so later ones may go nowhere).
    pub flipped_connections: u64,
}

/// The proxy's faults, shared with its connections.
pub struct Faults {
    /// Forward nothing until then, not even a close (as on a dead link).
    pub stall_until: Option<Instant>,
    /// Wait this long before forwarding each chunk (either direction).
    pub delay: Duration,
    /// Flip a bit in every Nth Data frame (type 7) from the shipper; 0: off.
    pub flip_every_data: u64,
    /// Flip a bit in each of the next this many frames (any type, the
    /// handshake's too).
    pub flip_next: u64,
    /// Cut each of the next this many frames (any type) and close.
    pub cut_next: u64,
    /// The same for frames after the handshake (ClientHello, ClientProof,
    /// Hello) only: Data, Heartbeat, History.
    pub flip_next_streaming: u64,
    pub cut_next_streaming: u64,
    /// Keep the first this many shipper→receiver frames of each connection.
    pub record_frames: usize,
    /// The recorded frames, per connection in accept order.
    pub recorded: Vec<Vec<Vec<u8>>>,
    pub counts: Counts,
    data_frames: u64,
    open: u64,
    drop_token: CancellationToken,
    rng: Rng,
}

impl Faults {
    /// All faults off (counts and recordings stay).
    pub fn clear(&mut self) {
        self.stall_until = None;
        self.delay = Duration::ZERO;
        self.flip_every_data = 0;
        self.flip_next = 0;
        self.cut_next = 0;
        self.flip_next_streaming = 0;
        self.cut_next_streaming = 0;
    }
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Where shippers connect.
    pub addr: String,
    state: Arc<Mutex<Faults>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (the receiver). `seed` drives where in
    /// a frame cuts and flips land.
    pub fn start(upstream: &str, seed: u64) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(Faults {
            stall_until: None,
            delay: Duration::ZERO,
            flip_every_data: 0,
            flip_next: 0,
            cut_next: 0,
            flip_next_streaming: 0,
            cut_next_streaming: 0,
            record_frames: 0,
            recorded: Vec::new(),
            counts: Counts::default(),
            data_frames: 0,
            open: 0,
            drop_token: CancellationToken::new(),
            rng: Rng::new(seed ^ 0x5eed_f00d_fa17),
        }));
        let upstream = upstream.to_string();
        let st = state.clone();
        rt.spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                let (stop, conn) = {
                    let mut f = st.lock().unwrap();
                    f.counts.connections += 1;
                    f.open += 1;
                    f.recorded.push(Vec::new());
                    (f.drop_token.clone(), f.recorded.len() - 1)
                };
                let st = st.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    serve(down, &upstream, &st, conn, stop).await;
                    st.lock().unwrap().open -= 1;
                });
            }
        });
        Proxy {
            addr,
            state,
            rt: Some(rt),
        }
    }

    /// Runs `f` on the faults.
    pub fn with<R>(&self, f: impl FnOnce(&mut Faults) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Closes every open connection (both sides).
    pub fn drop_all(&self) {
        self.with(|f| {
            f.drop_token.cancel();
            f.drop_token = CancellationToken::new();
            if f.open > 0 {
                f.counts.drops += 1;
                f.counts.dropped_connections += f.open;
            }
        });
    }

    /// Forwards nothing for `d`; connections stay open.
    pub fn stall(&self, d: Duration) {
        self.with(|f| {
            f.stall_until = Some(Instant::now() + d);
            f.counts.stalls += 1;
        });
    }

    pub fn counts(&self) -> Counts {
        self.with(|f| f.counts)
    }

    /// All faults off.
    pub fn clear(&self) {
        self.with(|f| f.clear());
    }

    /// A random mix of faults from `rng` for at most `dur` and at most
    /// `max_faults` faults, `between` called about every 50 ms in the pauses
    /// (200 to 800 ms) between them; then all faults off. Kinds: drop, stall
    /// (`stall_ms` range), delay (1 to 20 ms per chunk for one pause), cut of
    /// the next frame, flip of a bit in the next frame.
    pub fn chaos(
        &self,
        rng: &mut Rng,
        dur: Duration,
        max_faults: u32,
        stall_ms: (u64, u64),
        mut between: impl FnMut(),
    ) -> Counts {
        let end = Instant::now() + dur;
        let mut n = 0;
        // Each round of five is the five kinds in a random order, so every
        // kind comes up in a run of five or more.
        let mut deck: Vec<u64> = Vec::new();
        while Instant::now() < end && n < max_faults {
            n += 1;
            if deck.is_empty() {
                deck = (0..5).collect();
                for i in (1..deck.len()).rev() {
                    deck.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            match deck.pop().unwrap() {
                0 => self.drop_all(),
                1 => self.stall(Duration::from_millis(
                    stall_ms.0 + rng.below(stall_ms.1 - stall_ms.0),
                )),
                2 => self.with(|f| {
                    f.delay = Duration::from_millis(1 + rng.below(20));
                    f.counts.delays += 1;
                }),
                // Two in three cuts and flips hit the stream, one in three
                // whatever frame comes next (often a handshake's).
                3 if rng.below(3) == 0 => self.with(|f| f.cut_next += 1),
                3 => self.with(|f| f.cut_next_streaming += 1),
                _ if rng.below(3) == 0 => self.with(|f| f.flip_next += 1),
                _ => self.with(|f| f.flip_next_streaming += 1),
            }
            let pause = Instant::now() + Duration::from_millis(200 + rng.below(600));
            while Instant::now() < pause {
                between();
                std::thread::sleep(Duration::from_millis(50));
            }
            self.with(|f| f.delay = Duration::ZERO);
        }
        self.clear();
        self.counts()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One proxied connection, until either side ends it or a drop.
async fn serve(
    down: TcpStream,
    upstream: &str,
    st: &Mutex<Faults>,
    conn: usize,
    stop: CancellationToken,
) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    // Whichever side ends first ends the connection: both sockets are
    // dropped (closed) here.
    tokio::select! {
        _ = ship_to_receive(dr, uw, st, conn) => {}
        _ = receive_to_ship(ur, dw, st) => {}
        _ = stop.cancelled() => {}
    }
}

/// Waits out a stall, then the per-chunk delay.
async fn gate(st: &Mutex<Faults>) {
    loop {
        let (stall, delay) = {
            let f = st.lock().unwrap();
            (f.stall_until.filter(|u| *u > Instant::now()), f.delay)
        };
        if let Some(u) = stall {
            let left = u.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(20))).await;
            continue;
        }
        if !delay.is_zero() {
            st.lock().unwrap().counts.delayed_chunks += 1;
            tokio::time::sleep(delay).await;
        }
        return;
    }
}

/// What to do to one shipper→receiver frame.
enum Act {
    Pass,
    Flip(usize, u8),
    Cut(usize),
}

async fn ship_to_receive(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    st: &Mutex<Faults>,
    conn: usize,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    let mut raw = false;
    let mut index = 0usize;
    let mut flipped = false;
    loop {
        // A stall holds back closes and errors too, as a dead link would.
        let n = from.read(&mut chunk).await;
        gate(st).await;
        let n = n?;
        if n == 0 {
            let _ = to.shutdown().await;
            // Keep the other direction going until the receiver closes.
            std::future::pending::<()>().await;
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let take = if raw {
                buf.len()
            } else if buf.len() < 4 {
                0
            } else {
                let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if len == 0 || len > 8 << 20 {
                    raw = true;
                    buf.len()
                } else if buf.len() >= len + 8 {
                    len + 8
                } else {
                    0
                }
            };
            if take == 0 {
                break;
            }
            let mut unit: Vec<u8> = buf.drain(..take).collect();
            let act = if raw {
                Act::Pass
            } else {
                let mut f = st.lock().unwrap();
                if f.recorded[conn].len() < f.record_frames {
                    f.recorded[conn].push(unit.clone());
                }
                let is_data = unit[4] == 7;
                if is_data {
                    f.data_frames += 1;
                }
                index += 1;
                let streaming = index > 3;
                let every = f.flip_every_data;
                if f.cut_next > 0 || (streaming && f.cut_next_streaming > 0) {
                    if f.cut_next > 0 {
                        f.cut_next -= 1;
                    } else {
                        f.cut_next_streaming -= 1;
                    }
                    f.counts.cuts += 1;
                    Act::Cut(1 + f.rng.below(take as u64 - 1) as usize)
                } else if f.flip_next > 0
                    || (streaming && f.flip_next_streaming > 0)
                    || (is_data && every > 0 && f.data_frames % every == 0)
                {
                    if f.flip_next > 0 {
                        f.flip_next -= 1;
                    } else if streaming && f.flip_next_streaming > 0 {
                        f.flip_next_streaming -= 1;
                    }
                    f.counts.flips += 1;
                    if !flipped {
                        flipped = true;
                        f.counts.flipped_connections += 1;
                    }
                    // After the length prefix: type, payload or checksum.
                    let at = 4 + f.rng.below(take as u64 - 4) as usize;
                    Act::Flip(at, 1 << f.rng.below(8))
                } else {
                    Act::Pass
                }
            };
            match act {
                Act::Pass => to.write_all(&unit).await?,
                Act::Flip(at, bit) => {
                    unit[at] ^= bit;
                    to.write_all(&unit).await?;
                }
                Act::Cut(k) => {
                    to.write_all(&unit[..k]).await?;
                    to.flush().await?;
                    return Ok(());
                }
            }
        }
    }
}

async fn receive_to_ship(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    st: &Mutex<Faults>,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut chunk).await;
        gate(st).await;
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&chunk[..n]).await?;
    }
}
