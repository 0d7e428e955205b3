//! A reactor's channel to an NBD leaf: its connections, the backlog, reconnects through
//! connector threads. Reactor thread only, except the connector threads it spawns.

use super::conn::{errno_status, read_into, Conn, ConnState, Connected, Fail, Slot, CONNECT_GRACE};
use super::health::LossCode;
use super::wire::{open_checked, Stream};
use super::{
    bump, disconnect, protocol, Shared, BACKOFF_MAX, BACKOFF_MIN, PREFLUSH_COOKIE, RECONNECT_WAIT,
    RX_BYTES,
};
use rustix::event::{epoll, eventfd, EventfdFlags};
use stackbd_core::leaf::WaitHint;
use stackbd_core::{BioFlags, BioId, DataBuf, LeafChannel, LeafCx, Op, Status, SECTOR_SIZE};
use stackbd_nbd::{CmdFlags, Command, ReplyHeader, Request, TransmissionFlags};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) struct NbdChannel {
    sh: Arc<Shared>,
    depth: u32,
    slots: Vec<Slot>,
    conns: Vec<Conn>,
    backlog: VecDeque<BioId>,
    /// Round-robin cursor over connections.
    next_conn: usize,
    /// One epoll set over all connections when there are several.
    epoll: Option<OwnedFd>,
    next_timeout_check: Instant,
    completed: usize,
    /// The leaf's probe epoch as of the last time this channel looked (or lost a connection).
    seen_epoch: u64,
    /// Connections opened by connector threads, adopted by `reconnect_due`.
    connected_tx: Sender<Connected>,
    connected_rx: Receiver<Connected>,
    /// Readable when a connector thread has handed back a result: the reactor sleeps on it
    /// (directly, or through `epoll`) while a connect is pending instead of spinning.
    wake: Arc<OwnedFd>,
    /// Attempts given up while their thread still runs: until their late results are taken,
    /// `poll` keeps looking (a late result's wake-up would otherwise keep `epoll` readable).
    abandoned: u32,
}

/// `epoll` data of the wake eventfd (connections use their index).
const WAKE_DATA: u64 = u64::MAX;

impl NbdChannel {
    pub(super) fn new(sh: Arc<Shared>) -> NbdChannel {
        let depth = sh.opts.queue_depth.clamp(1, 4096);
        let n = sh.conns;
        let now = Instant::now();
        let slots = (0..depth * n)
            .map(|_| Slot {
                bio: BioId(0),
                busy: false,
                hdr: [0; 2 * Request::SIZE],
                hlen: 0,
                wdata: DataBuf::EMPTY,
                rdata: DataBuf::EMPTY,
                sent: 0,
                owed: 0,
                status: Status::Ok,
                started: now,
            })
            .collect();
        let conns = (0..n)
            .map(|c| Conn {
                state: ConnState::Down { next_attempt: now },
                backoff: BACKOFF_MIN,
                attempt: 0,
                base: c * depth,
                free: (c * depth..(c + 1) * depth).rev().collect(),
                sendq: VecDeque::with_capacity(depth as usize),
                rx: vec![0u8; RX_BYTES].into_boxed_slice(),
                rx_start: 0,
                rx_end: 0,
                cur: None,
                broken: false,
            })
            .collect();
        let epoll = if n > 1 {
            epoll::create(epoll::CreateFlags::CLOEXEC).ok()
        } else {
            None
        };
        let (connected_tx, connected_rx) = channel();
        let wake = Arc::new(
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .expect("eventfd for the nbd channel"),
        );
        if let Some(ep) = &epoll {
            let data = epoll::EventData::new_u64(WAKE_DATA);
            let _ = epoll::add(ep, &*wake, data, epoll::EventFlags::IN);
        }
        let mut ch = NbdChannel {
            connected_tx,
            connected_rx,
            wake,
            abandoned: 0,
            depth,
            slots,
            conns,
            backlog: VecDeque::with_capacity(4 * (depth * n) as usize),
            next_conn: 0,
            epoll,
            next_timeout_check: now,
            completed: 0,
            seen_epoch: sh.epoch.load(Ordering::Relaxed),
            sh,
        };
        ch.sh.health.channel_added(n);
        // Channels are made on their reactor: even the first connections are opened by
        // connector threads. Bios that come before them wait (up to `RECONNECT_WAIT`).
        for c in 0..ch.conns.len() {
            ch.start_connect(c, now);
        }
        ch
    }

    /// Starts a reconnect on a connector thread; its result comes back through `connected_rx`.
    fn start_connect(&mut self, c: usize, now: Instant) {
        let sh = self.sh.clone();
        let tx = self.connected_tx.clone();
        let wake = self.wake.clone();
        self.conns[c].attempt += 1;
        let attempt = self.conns[c].attempt;
        let spawned = std::thread::Builder::new()
            .name("nbd-connect".into())
            .spawn(move || {
                let res = std::panic::catch_unwind(|| open_checked(&sh, sh.opts.timeout))
                    .unwrap_or_else(|_| Err(io::Error::other("the connector panicked")));
                if let Err(e) = &res {
                    sh.health.connect_failed(e);
                }
                // Wake first, then send: the reactor takes results before it resets the
                // eventfd, so a result is never left behind a reset, and a readable eventfd
                // is never left behind an adopted result. The channel may be gone by now:
                // the stream then just closes.
                let _ = rustix::io::write(&*wake, &1u64.to_ne_bytes());
                let _ = tx.send((c, attempt, res));
            });
        match spawned {
            Ok(_) => self.conns[c].state = ConnState::Connecting { since: now },
            Err(e) => {
                self.sh.health.record(LossCode::NoThread);
                self.adopt(c, Err(e));
            }
        }
    }

    /// Takes a finished connection attempt: up, or down with a doubled backoff.
    fn adopt(&mut self, c: usize, res: io::Result<Stream>) {
        let conn = &mut self.conns[c];
        bump(if res.is_ok() {
            &self.sh.counters.connects
        } else {
            &self.sh.counters.connect_failures
        });
        match res {
            Ok(s) => {
                if let Some(ep) = &self.epoll {
                    let data = epoll::EventData::new_u64(c as u64);
                    let _ = epoll::add(ep, s.borrowed(), data, epoll::EventFlags::IN);
                }
                conn.state = ConnState::Up(s);
                self.sh.health.conn_up();
                conn.backoff = BACKOFF_MIN;
                conn.broken = false;
                conn.rx_start = 0;
                conn.rx_end = 0;
                conn.cur = None;
            }
            Err(_) => {
                self.sh.health.attempt_failed();
                conn.state = ConnState::Down {
                    next_attempt: Instant::now() + conn.backoff,
                };
                conn.backoff = (conn.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Reconnects connections whose backoff has passed, or all that are down when a probe
    /// succeeded since this channel last looked (the path checker saw the server answer).
    fn reconnect_due(&mut self, now: Instant) {
        let epoch = self.sh.epoch.load(Ordering::Relaxed);
        if epoch != self.seen_epoch {
            self.seen_epoch = epoch;
            bump(&self.sh.counters.nudges);
            for conn in &mut self.conns {
                if let ConnState::Down { next_attempt } = &mut conn.state {
                    *next_attempt = now;
                    conn.backoff = BACKOFF_MIN;
                }
            }
        }
        // Results come only from attempts in flight or given up: with none, a connection that
        // is merely down (backing off) costs no system call per reactor round.
        let expecting = self.abandoned > 0
            || self
                .conns
                .iter()
                .any(|c| matches!(c.state, ConnState::Connecting { .. }));
        if expecting {
            while let Ok((c, attempt, res)) = self.connected_rx.try_recv() {
                let conn = &self.conns[c];
                if matches!(conn.state, ConnState::Connecting { .. }) && conn.attempt == attempt {
                    self.adopt(c, res);
                } else {
                    self.abandoned = self.abandoned.saturating_sub(1);
                }
            }
            // After the results (see `start_connect`): a result sent after this read comes
            // with a fresh wake-up, or is taken by the next call (its connection is not up).
            let _ = rustix::io::read(&*self.wake, &mut [0u8; 8]);
        }
        let give_up = self.sh.opts.timeout + CONNECT_GRACE;
        for c in 0..self.conns.len() {
            match self.conns[c].state {
                ConnState::Down { next_attempt } if now >= next_attempt => {
                    self.start_connect(c, now);
                }
                ConnState::Connecting { since } if now.duration_since(since) > give_up => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect did not report back");
                    self.abandoned += 1;
                    self.sh.health.record(LossCode::ConnectHung);
                    self.adopt(c, Err(e));
                }
                _ => {}
            }
        }
    }

    /// True while a reconnect started less than [`RECONNECT_WAIT`] ago is in flight: bios
    /// wait for it in the backlog rather than fail.
    fn reconnect_pending(&self, now: Instant) -> bool {
        self.conns.iter().any(|c| match c.state {
            ConnState::Connecting { since } => now.duration_since(since) < RECONNECT_WAIT,
            _ => false,
        })
    }

    /// With no connection up and no reconnect worth waiting for, the backlog fails with path
    /// errors (a multipath above fails the path and goes elsewhere).
    fn fail_stranded_backlog(&mut self, cx: &mut LeafCx<'_>, now: Instant) {
        if self.backlog.is_empty() || self.conns.iter().any(Conn::up) || self.reconnect_pending(now)
        {
            return;
        }
        while let Some(id) = self.backlog.pop_front() {
            cx.complete(id, Status::PathError);
            self.completed += 1;
        }
    }

    /// Fails a connection: every bio in flight on it completes with a path error.
    fn fail_conn(&mut self, cx: &mut LeafCx<'_>, c: usize, why: Fail, now: Instant) {
        let timeout = self.sh.opts.timeout;
        // Only probes from now on speak for the server being back.
        self.seen_epoch = self.sh.epoch.load(Ordering::Relaxed);
        bump(&self.sh.counters.connection_losses);
        let conn = &mut self.conns[c];
        if let ConnState::Up(s) = &conn.state {
            if let Some(ep) = &self.epoll {
                let _ = epoll::delete(ep, s.borrowed());
            }
            self.sh.health.conn_lost(match why {
                Fail::Timeout => Some(LossCode::Timeout),
                Fail::Path(code) => code,
            });
        }
        conn.state = ConnState::Down {
            next_attempt: now + conn.backoff,
        };
        conn.backoff = (conn.backoff * 2).min(BACKOFF_MAX);
        conn.sendq.clear();
        conn.cur = None;
        conn.broken = false;
        conn.rx_start = 0;
        conn.rx_end = 0;
        for i in conn.base..conn.base + self.depth {
            let s = &mut self.slots[i as usize];
            if !s.busy {
                continue;
            }
            let st = match why {
                Fail::Timeout if now.duration_since(s.started) >= timeout => Status::Timeout,
                _ => Status::PathError,
            };
            s.busy = false;
            s.wdata = DataBuf::EMPTY;
            s.rdata = DataBuf::EMPTY;
            cx.complete(s.bio, st);
            self.completed += 1;
            conn.free.push(i);
        }
        self.fail_stranded_backlog(cx, now);
    }

    /// Picks a connected connection with a free slot; `Err(true)` if some are up but full.
    fn pick(&mut self) -> Result<usize, bool> {
        let n = self.conns.len();
        let mut any_up = false;
        for k in 0..n {
            let c = (self.next_conn + k) % n;
            let conn = &self.conns[c];
            if conn.up() && !conn.broken {
                any_up = true;
                if !conn.free.is_empty() {
                    self.next_conn = (c + 1) % n;
                    return Ok(c);
                }
            }
        }
        Err(any_up)
    }

    /// Bios that need no request. Returns the status if `id` is done without one.
    fn immediate(&self, cx: &mut LeafCx<'_>, id: BioId) -> Option<Status> {
        let f = self.sh.info.flags;
        match cx.bio(id).op {
            Op::Copy => Some(Status::NotSupported),
            Op::Flush if !f.contains(TransmissionFlags::SEND_FLUSH) => Some(Status::Ok),
            Op::Discard if !f.contains(TransmissionFlags::SEND_TRIM) => Some(Status::NotSupported),
            Op::WriteZeroes if !f.contains(TransmissionFlags::SEND_WRITE_ZEROES) => {
                Some(Status::NotSupported)
            }
            _ => None,
        }
    }

    /// Starts `id` on connection `c` (which has a free slot).
    fn start(&mut self, cx: &mut LeafCx<'_>, id: BioId, c: usize, now: Instant) {
        let f = self.sh.info.flags;
        let conn = &mut self.conns[c];
        let i = conn.free.pop().expect("picked a full connection");
        let bio = cx.bio(id);
        let mut flags = CmdFlags::empty();
        let (command, length) = match bio.op {
            Op::Read => (Command::Read, bio.bytes() as u32),
            Op::Write => (Command::Write, bio.bytes() as u32),
            Op::Flush => (Command::Flush, 0),
            Op::Discard => (Command::Trim, bio.bytes() as u32),
            Op::WriteZeroes => {
                if bio.flags.contains(BioFlags::NO_HOLE) {
                    flags = flags.union(CmdFlags::NO_HOLE);
                }
                (Command::WriteZeroes, bio.bytes() as u32)
            }
            Op::Copy => unreachable!("copy is refused before start"),
        };
        if bio.op.is_write()
            && bio.flags.contains(BioFlags::FUA)
            && f.contains(TransmissionFlags::SEND_FUA)
        {
            flags = flags.union(CmdFlags::FUA);
        }
        let preflush = bio.op.is_write()
            && bio.flags.contains(BioFlags::PREFLUSH)
            && f.contains(TransmissionFlags::SEND_FLUSH);
        let s = &mut self.slots[i as usize];
        let mut h = 0;
        if preflush {
            // Earlier writes completed before this bio was submitted, so a flush sent with it
            // covers them whatever order the server runs the two in.
            let fl = Request {
                flags: CmdFlags::empty(),
                command: Command::Flush,
                cookie: PREFLUSH_COOKIE | u64::from(i),
                offset: 0,
                length: 0,
            };
            s.hdr[..Request::SIZE].copy_from_slice(&fl.to_bytes());
            h = Request::SIZE;
        }
        let req = Request {
            flags,
            command,
            cookie: u64::from(i),
            offset: bio.sector * SECTOR_SIZE as u64,
            length,
        };
        s.hdr[h..h + Request::SIZE].copy_from_slice(&req.to_bytes());
        s.hlen = (h + Request::SIZE) as u8;
        s.bio = id;
        s.busy = true;
        s.sent = 0;
        s.owed = 1 + preflush as u8;
        s.status = Status::Ok;
        s.started = now;
        s.wdata = if bio.op == Op::Write {
            bio.data
        } else {
            DataBuf::EMPTY
        };
        s.rdata = if bio.op == Op::Read {
            bio.data
        } else {
            DataBuf::EMPTY
        };
        conn.sendq.push_back(i);
    }

    fn finish(&mut self, cx: &mut LeafCx<'_>, c: usize, i: u32) {
        let s = &mut self.slots[i as usize];
        s.busy = false;
        s.wdata = DataBuf::EMPTY;
        s.rdata = DataBuf::EMPTY;
        cx.complete(s.bio, s.status);
        self.completed += 1;
        self.conns[c].free.push(i);
    }

    /// Reads replies on connection `c`. Err on a lost connection or a protocol violation.
    fn receive(&mut self, cx: &mut LeafCx<'_>, c: usize) -> io::Result<()> {
        loop {
            let conn = &mut self.conns[c];
            let ConnState::Up(stream) = &mut conn.state else {
                return Ok(());
            };
            if let Some((i, got)) = conn.cur {
                let s = &self.slots[i as usize];
                let d = s.rdata;
                let mut got = got;
                let avail = conn.rx_end - conn.rx_start;
                if avail > 0 {
                    let k = avail.min(d.len() - got);
                    d.write_from(got, &conn.rx[conn.rx_start..conn.rx_start + k]);
                    conn.rx_start += k;
                    got += k;
                }
                while got < d.len() {
                    match read_into(stream, &d, got) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            conn.cur = Some((i, got));
                            return Ok(());
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                conn.cur = None;
                let s = &mut self.slots[i as usize];
                s.owed -= 1;
                if s.owed == 0 {
                    self.finish(cx, c, i);
                }
                continue;
            }
            // A reply header.
            let avail = conn.rx_end - conn.rx_start;
            let hdr = match ReplyHeader::decode(&conn.rx[conn.rx_start..conn.rx_end]) {
                Ok(Some((ReplyHeader::Simple(r), n))) => {
                    conn.rx_start += n;
                    r
                }
                Ok(Some((ReplyHeader::Structured(_), _))) => {
                    return Err(protocol("structured reply without negotiation"))
                }
                Err(e) => return Err(protocol(e)),
                Ok(None) => {
                    // Need more bytes: compact and read.
                    if conn.rx_start > 0 {
                        conn.rx.copy_within(conn.rx_start..conn.rx_end, 0);
                        conn.rx_start = 0;
                        conn.rx_end = avail;
                    }
                    match stream.read(&mut conn.rx[conn.rx_end..]) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => conn.rx_end += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                    continue;
                }
            };
            if conn.rx_start == conn.rx_end {
                conn.rx_start = 0;
                conn.rx_end = 0;
            }
            let cookie = hdr.cookie;
            let i = (cookie & !PREFLUSH_COOKIE) as u32;
            let companion = cookie & PREFLUSH_COOKIE != 0;
            if cookie >> 33 != 0
                || i < conn.base
                || i >= conn.base + self.depth
                || !self.slots[i as usize].busy
            {
                return Err(protocol(format!("reply to unknown cookie {cookie:#x}")));
            }
            let s = &mut self.slots[i as usize];
            if s.sent < s.total() {
                return Err(protocol(format!("reply to unsent request {cookie:#x}")));
            }
            match hdr.error {
                Some(e) => s.status.merge(errno_status(e)),
                None if !companion && !s.rdata.is_empty() => {
                    conn.cur = Some((i, 0));
                    continue;
                }
                None => {}
            }
            s.owed -= 1;
            if s.owed == 0 {
                self.finish(cx, c, i);
            }
        }
    }

    /// Starts backlogged bios while slots are free.
    fn drain_backlog(&mut self, cx: &mut LeafCx<'_>, now: Instant) {
        while let Some(&id) = self.backlog.front() {
            match self.pick() {
                Ok(c) => {
                    self.backlog.pop_front();
                    self.start(cx, id, c, now);
                }
                Err(_) => break,
            }
        }
    }

    fn check_timeouts(&mut self, cx: &mut LeafCx<'_>, now: Instant) {
        let timeout = self.sh.opts.timeout;
        self.next_timeout_check = now + (timeout / 4).min(Duration::from_millis(100));
        for c in 0..self.conns.len() {
            let conn = &self.conns[c];
            if !conn.up() || conn.inflight(self.depth) == 0 {
                continue;
            }
            let base = conn.base as usize;
            let old = self.slots[base..base + self.depth as usize]
                .iter()
                .any(|s| s.busy && now.duration_since(s.started) >= timeout);
            if old {
                self.fail_conn(cx, c, Fail::Timeout, now);
            }
        }
    }
}

impl LeafChannel for NbdChannel {
    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        if let Some(st) = self.immediate(cx, id) {
            cx.complete(id, st);
            return;
        }
        if !self.backlog.is_empty() {
            self.backlog.push_back(id);
            return;
        }
        let now = Instant::now();
        match self.pick() {
            Ok(c) => self.start(cx, id, c, now),
            Err(true) => self.backlog.push_back(id),
            Err(false) => {
                self.reconnect_due(now);
                match self.pick() {
                    Ok(c) => self.start(cx, id, c, now),
                    Err(true) => self.backlog.push_back(id),
                    Err(false) if self.reconnect_pending(now) => {
                        if cx.bio(id).flags.contains(BioFlags::NOWAIT) {
                            // It would have to wait for the connection.
                            cx.complete(id, Status::Again);
                        } else {
                            self.backlog.push_back(id);
                        }
                    }
                    Err(false) => cx.complete(id, Status::PathError),
                }
            }
        }
    }

    fn poll(&mut self, cx: &mut LeafCx<'_>) -> usize {
        let before = self.completed;
        let now = Instant::now();
        for c in 0..self.conns.len() {
            let conn = &mut self.conns[c];
            if !conn.up() {
                continue;
            }
            // A broken connection's error was recorded when it broke.
            let res = if conn.broken {
                Err(None)
            } else {
                match conn.flush_out(&mut self.slots) {
                    Ok(_) => self.receive(cx, c),
                    Err(e) => Err(e),
                }
                .map_err(|e| Some(LossCode::of(&e)))
            };
            if let Err(code) = res {
                self.fail_conn(cx, c, Fail::Path(code), now);
            }
        }
        if self.abandoned > 0 || self.conns.iter().any(|c| !c.up()) {
            self.reconnect_due(now);
            self.fail_stranded_backlog(cx, now);
        }
        if now >= self.next_timeout_check {
            self.check_timeouts(cx, now);
        }
        self.drain_backlog(cx, now);
        // What the backlog just started goes out now rather than on the next round.
        for c in 0..self.conns.len() {
            let conn = &mut self.conns[c];
            if conn.up() && !conn.sendq.is_empty() {
                if let Err(e) = conn.flush_out(&mut self.slots) {
                    self.sh.health.record(LossCode::of(&e));
                    conn.broken = true;
                }
            }
        }
        self.completed - before
    }

    fn needs_poll(&self) -> bool {
        true
    }

    fn prepare_wait(&mut self) -> WaitHint {
        let mut pending = false;
        let mut busy = 0;
        let mut fd = None;
        for conn in &mut self.conns {
            if !conn.up() {
                continue;
            }
            match conn.flush_out(&mut self.slots) {
                Ok(true) => {}
                Ok(false) => pending = true,
                Err(e) => {
                    self.sh.health.record(LossCode::of(&e));
                    conn.broken = true;
                }
            }
            if conn.broken {
                pending = true;
            }
            if conn.inflight(self.depth) > 0 {
                busy += 1;
                fd = conn.fd();
            }
        }
        let connecting = self
            .conns
            .iter()
            .any(|c| matches!(c.state, ConnState::Connecting { .. }));
        if pending || (!self.backlog.is_empty() && self.conns.iter().any(Conn::up)) {
            return WaitHint::Spin;
        }
        if !self.backlog.is_empty() {
            // No connection up: the backlog waits for a connector thread, which wakes us (or
            // for the reactor's next look around, which fails it after `RECONNECT_WAIT`).
            return WaitHint::Fd(self.wake.as_raw_fd());
        }
        match (busy, fd, &self.epoll) {
            (0, _, _) if connecting => WaitHint::Fd(self.wake.as_raw_fd()),
            (0, _, _) => WaitHint::Idle,
            (1, Some(fd), _) => WaitHint::Fd(fd),
            (_, _, Some(ep)) => WaitHint::Fd(ep.as_raw_fd()),
            _ => WaitHint::Spin,
        }
    }
}

impl Drop for NbdChannel {
    fn drop(&mut self) {
        let up = self.conns.iter().filter(|c| c.up()).count() as u32;
        self.sh.health.channel_dropped(self.conns.len() as u32, up);
        for conn in &mut self.conns {
            if let ConnState::Up(s) = &mut conn.state {
                if conn.sendq.is_empty() {
                    disconnect(s);
                }
            }
        }
    }
}
