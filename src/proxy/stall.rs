//! Clients that take nothing of what they are sent. A client that stops
//! reading would otherwise hold its exchange for good: hyper polls a
//! response body only when it has room for more, so the body's own
//! `idle_timeout` (which waits for the backend) never runs, and the backend
//! connection, its lease and the route's slot stay taken. Two watches cut
//! such a client off after `idle_timeout` without a byte taken:
//!
//! - [`WatchedIo`], under every HTTP client connection: a write (or flush)
//!   that has waited that long fails, and hyper drops the connection with
//!   its exchange (an HTTP/1.1 client whose TCP window stays shut, or an
//!   HTTP/2 one on the whole connection);
//! - [`StreamExec`], which runs each HTTP/2 stream: a stream whose response
//!   has handed out a frame that waits that long for the client's
//!   flow-control window is dropped (hyper resets it with `CANCEL`), the
//!   connection's other streams go on.
//!
//! A response body dropped with its exchange cut so counts it, on its route,
//! as `client_not_reading` (see [`Stall::take_cut`]).
//!
//! "Taken" is what the client's TCP acknowledged, not only what the kernel
//! let us write: a socket turns writable again only once about a third of
//! its send buffer (up to a few MiB) has drained, which a client reading a
//! few hundred bytes a second takes longer than `idle_timeout` to do. So
//! while a write waits, the socket's send queue ([`SendQueue`]) is asked
//! every quarter of `idle_timeout`: each time it holds less than the time
//! before, the client took bytes, and its `idle_timeout` runs from then. A
//! stream's wait begins again while its connection waits on the socket (the
//! connection's own watch then judges the client).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// What a client connection's (or one of its HTTP/2 streams') watch knows:
/// whether it cut the client off, and, for a stream, what its response body
/// last did.
#[derive(Default)]
pub struct Stall {
    /// Set when the connection (the stream) was cut off.
    cut: AtomicBool,
    /// Set once a response body cut off with it counted the cut.
    counted: AtomicBool,
    /// A stream's connection, whose cut is the stream's too.
    conn: Option<Arc<Stall>>,
    /// A stream's response body: frames handed out × 4 + its phase
    /// (`HANDED`, `ASKED`, `DONE`; 0 before it began).
    body: AtomicU64,
    /// A connection's: a write waits for the client's socket to take more.
    blocked: AtomicBool,
    /// A connection's: waits for its socket that ended (it took more).
    unblocked: AtomicU64,
}

/// A client connection's TCP socket, asked how much it still holds to send
/// (see the module's notes). Holds the descriptor, not the socket: it is
/// asked only by what owns the connection's IO, while that lives.
#[derive(Clone, Copy, Debug)]
pub struct SendQueue(RawFd);

impl SendQueue {
    /// `sock`'s; to be asked only while `sock` is open.
    pub fn of(sock: &impl AsRawFd) -> SendQueue {
        SendQueue(sock.as_raw_fd())
    }

    /// Bytes written to the socket that the client has not acknowledged.
    pub fn bytes(self) -> Option<u32> {
        crate::sockopt::send_queue(self.0)
    }
}

/// When a waiting connection's client was last seen taking bytes: when the
/// wait began, or when its socket was found holding less than when last
/// asked.
struct Taken {
    held: Option<u32>,
    at: Instant,
}

impl Taken {
    fn begin(q: Option<SendQueue>) -> Taken {
        Taken {
            held: q.and_then(SendQueue::bytes),
            at: Instant::now(),
        }
    }

    /// How long ago the client last took bytes, asking the socket now.
    fn since(&mut self, q: Option<SendQueue>) -> Duration {
        let now = Instant::now();
        let held = q.and_then(SendQueue::bytes);
        if matches!((self.held, held), (Some(a), Some(n)) if n < a) {
            self.at = now;
        }
        self.held = held;
        now.saturating_duration_since(self.at)
    }
}

/// The body's last frame went out to hyper, which has not asked for another
/// since: it waits for the client to take what it holds.
const HANDED: u64 = 1;
/// The body was asked for a frame it does not have yet (the backend's turn).
const ASKED: u64 = 2;
/// The body has ended (or failed).
const DONE: u64 = 3;
const PHASE: u64 = 3;

impl Stall {
    /// A client connection's.
    pub fn conn() -> Arc<Stall> {
        Arc::new(Stall::default())
    }

    /// An HTTP/2 stream's of `conn`.
    fn stream(conn: &Arc<Stall>) -> Arc<Stall> {
        Arc::new(Stall {
            conn: Some(Arc::clone(conn)),
            ..Stall::default()
        })
    }

    /// Whether the client was cut off (on this stream, or on the whole
    /// connection).
    pub fn was_cut(&self) -> bool {
        self.cut.load(Relaxed) || self.conn.as_ref().is_some_and(|c| c.cut.load(Relaxed))
    }

    /// Whether the client was cut off; notes the cut counted when it was
    /// (by the response body cut off with it, which calls this as it is
    /// dropped).
    pub fn take_cut(&self) -> bool {
        if !self.was_cut() {
            return false;
        }
        self.counted.store(true, Relaxed);
        if let Some(c) = &self.conn {
            c.counted.store(true, Relaxed);
        }
        true
    }

    /// Whether the connection was cut off with no response body there to
    /// count it (its last response was all in hyper's buffers).
    pub fn uncounted_cut(&self) -> bool {
        self.cut.load(Relaxed) && !self.counted.load(Relaxed)
    }

    /// Notes the client cut off.
    pub(crate) fn cut_off(&self) {
        self.cut.store(true, Relaxed);
    }

    /// A stream's response body: frames handed out, and whether the last
    /// one waits for the client.
    #[cfg(test)]
    pub(crate) fn body_state(&self) -> (u64, bool) {
        let b = self.body.load(Relaxed);
        (b / 4, b & PHASE == HANDED)
    }

    /// Whether the connection's writes wait for its socket, and how many
    /// such waits ended before.
    fn connection_blocked(&self) -> (bool, u64) {
        self.conn.as_ref().map_or((false, 0), |c| {
            (c.blocked.load(Relaxed), c.unblocked.load(Relaxed))
        })
    }

    fn note(&self, frames: u64, phase: u64) {
        self.body.store(frames.wrapping_mul(4) | phase, Relaxed);
    }

    /// The response body handed out its `frames`th frame.
    pub fn handed(&self, frames: u64) {
        self.note(frames, HANDED);
    }

    /// The response body was asked for a frame it does not have yet.
    pub fn asked(&self, frames: u64) {
        self.note(frames, ASKED);
    }

    /// The response body ended.
    pub fn done(&self, frames: u64) {
        self.note(frames, DONE);
    }
}

tokio::task_local! {
    /// Set while an HTTP/2 stream's task runs it (see [`StreamExec`]).
    static STREAM: Arc<Stall>;
}

/// The watch of the HTTP/2 stream running now, if one is.
pub fn current_stream() -> Option<Arc<Stall>> {
    STREAM.try_with(Arc::clone).ok()
}

/// A wait that runs out `idle` after it began, on one timer kept for all
/// the waits of a connection or stream: it is moved only when it went off
/// for an earlier wait, so a wait that ends before its time costs no timer
/// change.
#[derive(Default)]
struct Wait {
    /// What is waited for (a stream body's state; 0 for writes).
    what: u64,
    /// When the wait runs out; `None`: no wait.
    due: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Wait {
    /// Ends the wait: what was waited for came.
    fn clear(&mut self) {
        self.due = None;
    }

    /// Whether a wait is on.
    fn waiting(&self) -> bool {
        self.due.is_some()
    }

    /// Whether the wait for `what` (a new one when it differs from the
    /// last) has lasted `idle`; otherwise `cx` is woken when it will have.
    fn over(&mut self, cx: &mut Context<'_>, what: u64, idle: Duration) -> bool {
        let due = match self.due {
            Some(d) if self.what == what => d,
            _ => {
                let d = Instant::now() + idle;
                self.what = what;
                self.due = Some(d);
                d
            }
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        // The timer is never later than `due` (waits begin in time order).
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= due {
                return true;
            }
            timer.as_mut().reset(due);
        }
    }
}

/// A client connection's IO whose writes fail once one has waited
/// `idle` (zero: never) for the client to take something: a write, a
/// flush or a shutdown that stays pending, with no byte written since it
/// began to wait. Only a wait that hyper comes back to is failed (the timer
/// wakes it, and it writes again), so a connection with nothing to send is
/// never cut.
pub struct WatchedIo<IO> {
    io: IO,
    idle: Duration,
    stall: Arc<Stall>,
    wait: Wait,
    /// The socket under `io`, when it is a TCP socket's.
    queue: Option<SendQueue>,
    taken: Taken,
    failed: bool,
}

impl<IO> WatchedIo<IO> {
    /// Watches `io`, whose socket is `queue`'s (see [`SendQueue`]); a cut
    /// is noted in `stall`.
    pub fn new(
        io: IO,
        idle: Duration,
        stall: Arc<Stall>,
        queue: Option<SendQueue>,
    ) -> WatchedIo<IO> {
        WatchedIo {
            io,
            idle,
            stall,
            wait: Wait::default(),
            queue,
            taken: Taken::begin(None),
            failed: false,
        }
    }

    /// Notes a write's result: progress ends the wait, a pending write
    /// starts or goes on with it, and fails once it is over.
    fn after<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
        moved: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match &r {
            Poll::Pending if !self.idle.is_zero() => {
                if !self.wait.waiting() {
                    self.taken = Taken::begin(self.queue);
                    self.stall.blocked.store(true, Relaxed);
                }
                // The socket, when there is one to ask, is asked every
                // quarter of idle_timeout: a client is cut at most that
                // much later than idle_timeout after its last byte taken.
                let step = if self.queue.is_some() {
                    self.idle / 4
                } else {
                    self.idle
                };
                while self.wait.over(cx, 0, step) {
                    if self.taken.since(self.queue) < self.idle {
                        self.wait.clear();
                        continue;
                    }
                    debug!("the client took nothing for idle_timeout: cut off");
                    self.failed = true;
                    self.stall.cut_off();
                    return Poll::Ready(Err(not_reading()));
                }
            }
            Poll::Ready(Ok(v)) if moved(v) && self.wait.waiting() => {
                self.wait.clear();
                self.stall.blocked.store(false, Relaxed);
                self.stall.unblocked.fetch_add(1, Relaxed);
            }
            Poll::Pending | Poll::Ready(_) => {}
        }
        r
    }
}

fn not_reading() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client took nothing for idle_timeout",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for WatchedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WatchedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(not_reading()));
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.after(cx, r, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(not_reading()));
        }
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.after(cx, r, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(not_reading()));
        }
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.after(cx, r, |_| true)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(not_reading()));
        }
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.after(cx, r, |_| true)
    }
}

/// Runs the streams of one HTTP/2 client connection (hyper's executor),
/// each with its own [`Stall`] (set as [`current_stream`] while the stream
/// runs, for its response body to note what it does): a stream whose
/// response body's last frame has waited `idle` (zero: never) for the
/// client's window is dropped.
#[derive(Clone)]
pub struct StreamExec {
    conn: Arc<Stall>,
    idle: Duration,
}

impl StreamExec {
    /// The executor of a connection watched by `conn`.
    pub fn new(conn: Arc<Stall>, idle: Duration) -> StreamExec {
        StreamExec { conn, idle }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let stall = Stall::stream(&self.conn);
        tokio::spawn(STREAM.scope(Arc::clone(&stall), watch_stream(fut, stall, self.idle)));
    }
}

/// Runs `fut` (a stream's task) until it ends, or until its response body
/// has waited `idle` for the client to take a frame it handed out (the
/// stream is then dropped: hyper resets it, and drops the body).
async fn watch_stream<F: Future<Output = ()>>(fut: F, stall: Arc<Stall>, idle: Duration) {
    let mut fut = std::pin::pin!(fut);
    let mut wait = Wait::default();
    // The connection's ended socket waits when this stream's wait began.
    let mut unblocked_then = 0;
    std::future::poll_fn(|cx| {
        if fut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let body = stall.body.load(Relaxed);
        if idle.is_zero() || body & PHASE != HANDED {
            wait.clear();
            return Poll::Pending;
        }
        if !(wait.waiting() && wait.what == body) {
            unblocked_then = stall.connection_blocked().1;
        }
        while wait.over(cx, body, idle) {
            // Its frames wait behind the connection's socket, which the
            // connection's watch judges, as long as that socket took
            // nothing all along: once it took more, the stream's window
            // (the client's) is what holds it.
            if stall.connection_blocked() == (true, unblocked_then) {
                wait.clear();
                continue;
            }
            debug!("the client took nothing of the stream's response for idle_timeout: reset");
            stall.cut_off();
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
}

/// A loopback TCP connection, (reader, writer), whose writer has a large
/// send buffer and whose reader takes small segments, as on the internet
/// (loopback's are 64 KiB): the reader's window opens a little at each
/// read, and the writer's socket takes a write only long after.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn slow_reader_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_mss(1400).unwrap();
    s.set_recv_buffer_size(256 << 10).unwrap();
    s.connect(&l.local_addr().unwrap().into()).unwrap();
    s.set_nonblocking(true).unwrap();
    let reader = tokio::net::TcpStream::from_std(s.into()).unwrap();
    let (w, _) = l.accept().await.unwrap();
    socket2::SockRef::from(&w)
        .set_send_buffer_size(4 << 20)
        .unwrap();
    (reader, w)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Real time (the machine may be busy: bounds are loose).
    const IDLE: Duration = Duration::from_millis(400);

    /// Whether `d` is `IDLE`, give or take a busy machine.
    fn about_idle(d: Duration) -> bool {
        d >= IDLE && d < IDLE * 3
    }

    #[tokio::test]
    async fn a_write_the_client_never_takes_fails_at_idle_timeout() {
        let (a, mut b) = tokio::io::duplex(1024);
        let stall = Stall::conn();
        let mut w = WatchedIo::new(a, IDLE, Arc::clone(&stall), None);
        let begun = Instant::now();
        let chunk = [7u8; 256];
        let err = loop {
            if let Err(e) = w.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // The pipe filled at once; then idle_timeout.
        assert!(about_idle(begun.elapsed()), "{:?}", begun.elapsed());
        assert!(stall.was_cut() && stall.uncounted_cut());
        assert!(stall.take_cut());
        assert!(!stall.uncounted_cut());
        // What was written is still there to read; writes fail from now on.
        let mut buf = [0u8; 1024];
        assert_eq!(b.read(&mut buf).await.unwrap(), 1024);
        assert!(w.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn a_slow_reader_is_never_cut() {
        let (a, mut b) = tokio::io::duplex(64);
        let stall = Stall::conn();
        let mut w = WatchedIo::new(a, IDLE, Arc::clone(&stall), None);
        // A byte taken every half idle_timeout, eight times: each write
        // waits that long, never longer; then the rest at once.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..8 {
                tokio::time::sleep(IDLE / 2).await;
                b.read_exact(&mut buf[..1]).await.unwrap();
            }
            let mut rest = Vec::new();
            b.read_to_end(&mut rest).await.unwrap();
            rest.len() + 8
        });
        let begun = Instant::now();
        w.write_all(&[1u8; 64 + 8]).await.unwrap();
        assert!(begun.elapsed() >= IDLE * 4, "{:?}", begun.elapsed());
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), 64 + 8);
        assert!(!stall.was_cut());
    }

    /// A TCP connection whose writer has a large send buffer and whose
    /// reader a small receive buffer, watched with (or without) its socket;
    /// the reader takes 256 KiB every half idle_timeout. Returns whether the
    /// writer was cut off, and the longest a write waited (the last one
    /// until the reader's end).
    async fn slow_tcp_reader(with_queue: bool) -> (bool, Duration) {
        let (mut reader, w) = slow_reader_pair().await;
        let queue = with_queue.then(|| SendQueue::of(&w));
        let stall = Stall::conn();
        let mut w = WatchedIo::new(w, IDLE, Arc::clone(&stall), queue);
        let mut read = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            for _ in 0..10 {
                tokio::time::sleep(IDLE / 2).await;
                if reader.read_exact(&mut buf).await.is_err() {
                    break;
                }
            }
            // Closed only once the writer is done with it.
            reader
        });
        let chunk = [3u8; 16384];
        let mut longest = Duration::ZERO;
        // Until the writer is cut off, or the reader has taken its last.
        loop {
            let begun = Instant::now();
            tokio::select! {
                r = w.write(&chunk) => {
                    longest = longest.max(begun.elapsed());
                    if r.is_err() {
                        break;
                    }
                }
                _ = &mut read => {
                    longest = longest.max(begun.elapsed());
                    break;
                }
            }
        }
        (stall.was_cut(), longest)
    }

    #[tokio::test]
    async fn a_slow_reader_behind_a_large_send_buffer_is_not_cut() {
        // Without the socket's queue, writability is all the watch sees:
        // the kernel's buffer takes more only once a third of it drained,
        // far more than the reader takes in idle_timeout.
        let (cut, _) = slow_tcp_reader(false).await;
        assert!(cut, "the case the queue is for");
        let (cut, longest) = slow_tcp_reader(true).await;
        assert!(!cut);
        assert!(longest > IDLE, "a write waited {longest:?}");
    }

    #[tokio::test]
    async fn zero_idle_timeout_never_cuts() {
        let (a, _b) = tokio::io::duplex(16);
        let mut w = WatchedIo::new(a, Duration::ZERO, Stall::conn(), None);
        let write = w.write_all(&[1u8; 64]);
        assert!(tokio::time::timeout(IDLE * 2, write).await.is_err());
    }

    /// A stream's task that notes `phase` for its body's next frame every
    /// `every` (once, with `None`); `dropped` is set when it is dropped.
    struct FakeStream {
        stall: Arc<Stall>,
        phase: u64,
        every: Option<Duration>,
        sleep: Option<Pin<Box<Sleep>>>,
        frames: u64,
        dropped: Arc<AtomicBool>,
    }

    impl Future for FakeStream {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            loop {
                if let Some(s) = &mut self.sleep {
                    if s.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                if self.every.is_none() && self.frames > 0 {
                    return Poll::Pending;
                }
                self.frames += 1;
                let (frames, phase) = (self.frames, self.phase);
                self.stall.note(frames, phase);
                if let Some(d) = self.every {
                    self.sleep = Some(Box::pin(tokio::time::sleep(d)));
                }
            }
        }
    }

    impl Drop for FakeStream {
        fn drop(&mut self) {
            self.dropped.store(true, Relaxed);
        }
    }

    /// Runs a [`FakeStream`] for at most `run`, watched as [`StreamExec`]
    /// runs it; returns when it was cut, if it was.
    async fn watched(phase: u64, every: Option<Duration>, run: Duration) -> Option<Duration> {
        watched_on(Stall::conn(), phase, every, run).await
    }

    /// [`watched`], on the connection `conn`.
    async fn watched_on(
        conn: Arc<Stall>,
        phase: u64,
        every: Option<Duration>,
        run: Duration,
    ) -> Option<Duration> {
        let stall = Stall::stream(&conn);
        let dropped = Arc::new(AtomicBool::new(false));
        let fake = FakeStream {
            stall: Arc::clone(&stall),
            phase,
            every,
            sleep: None,
            frames: 0,
            dropped: Arc::clone(&dropped),
        };
        let begun = Instant::now();
        let r = tokio::time::timeout(run, watch_stream(fake, Arc::clone(&stall), IDLE)).await;
        assert!(
            dropped.load(Relaxed),
            "the stream's task is dropped either way"
        );
        match r {
            Ok(()) => {
                assert!(stall.was_cut() && !conn.was_cut());
                assert!(stall.take_cut());
                assert!(
                    !conn.uncounted_cut(),
                    "the stream's cut is not the connection's"
                );
                Some(begun.elapsed())
            }
            Err(_) => {
                assert!(!stall.was_cut());
                None
            }
        }
    }

    #[tokio::test]
    async fn a_stream_whose_frame_is_never_taken_is_dropped_at_idle_timeout() {
        let cut = watched(HANDED, None, IDLE * 5).await;
        assert!(cut.is_some_and(about_idle), "{cut:?}");
    }

    #[tokio::test]
    async fn a_stream_behind_its_connections_blocked_socket_is_the_connections_business() {
        let conn = Stall::conn();
        conn.blocked.store(true, Relaxed);
        assert_eq!(
            watched_on(Arc::clone(&conn), HANDED, None, IDLE * 3).await,
            None
        );
        // A socket that takes more meanwhile (other streams' frames) while
        // this stream's frame stays: its own window holds it.
        let busy = Arc::clone(&conn);
        let other_streams = tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE / 4).await;
                busy.unblocked.fetch_add(1, Relaxed);
            }
        });
        let cut = watched_on(conn, HANDED, None, IDLE * 5).await;
        other_streams.abort();
        assert!(cut.is_some_and(about_idle), "{cut:?}");
    }

    #[tokio::test]
    async fn streams_that_take_frames_or_wait_for_their_backend_run_on() {
        // A frame taken every half idle_timeout.
        assert_eq!(watched(HANDED, Some(IDLE / 2), IDLE * 4).await, None);
        // A body that waits for its backend (its own idle_timeout's
        // business), or has ended.
        assert_eq!(watched(ASKED, None, IDLE * 3).await, None);
        assert_eq!(watched(DONE, None, IDLE * 3).await, None);
    }

    #[test]
    fn a_connection_cut_is_its_streams_cut() {
        let conn = Stall::conn();
        let s1 = Stall::stream(&conn);
        let s2 = Stall::stream(&conn);
        assert!(!s1.take_cut());
        conn.cut_off();
        assert!(s1.was_cut() && s2.was_cut());
        assert!(conn.uncounted_cut());
        assert!(s1.take_cut());
        assert!(!conn.uncounted_cut());
        assert!(s2.take_cut());
    }

    #[tokio::test]
    async fn the_stream_executor_sets_the_current_stream() {
        let exec = StreamExec::new(Stall::conn(), IDLE);
        assert!(current_stream().is_none());
        let (tx, rx) = tokio::sync::oneshot::channel();
        hyper::rt::Executor::execute(&exec, async move {
            let _ = tx.send(current_stream().is_some());
        });
        assert!(rx.await.unwrap());
    }
}
