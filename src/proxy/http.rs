//! HTTP reverse proxying with hyper: routing by Host, forwarding headers,
//! hop-by-hop stripping, streamed bodies with byte counting, WebSocket/Upgrade
//! passthrough and clear 4xx/5xx answers.

use crate::proxy::access_log::{clip_path, Kind as LogKind};
use crate::proxy::io::{pause_after, poll_pause, splice, Pause, Throttle};
use crate::proxy::names::DomainName;
use crate::proxy::server::{Record, Route, Shared};
use crate::proxy::settings::{Backend, BackendProtocol, TlsMode};
use crate::proxy::stall::{self, Stall};
use crate::proxy::stats::{Counters, ErrorKind};
use crate::proxy::upstream::{
    BackendTlsClient, H2Sender, Held, Lease, Pooled, TlsFailure, UpstreamError, Upstreams,
};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

/// The body type of every response (and of requests sent to backends).
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body's error: hyper's, or the proxy's own (a request body over the
/// route's `max_body_size`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the proxy failed a body (over `max_body_size`, nothing for
/// `idle_timeout`, a response the backend broke off): the error kind it
/// was counted as, for the access log, and the message.
#[derive(Debug)]
struct BodyFailed(ErrorKind, &'static str);

impl std::fmt::Display for BodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.1)
    }
}

impl std::error::Error for BodyFailed {}

/// What is left of a request body's allowance.
struct BodyLimit {
    left: u64,
}

/// A client's request body as it goes to the backend: why it failed, when
/// it did (the exchange is then the client's failure, 413, 408 or 400, not
/// the backend's 502, and a shared HTTP/2 backend connection is kept), when
/// it ended (the backend's `response_timeout` runs from then: an upload
/// takes the time it takes, its stalls are `idle_timeout`'s), and, while it
/// has not, when the backend last took a frame of it and since when it
/// waits for the client (a backend that takes none and does not answer is
/// failed by [`send`]).
#[derive(Clone)]
struct ClientBody(Arc<ClientBodyState>);

struct ClientBodyState {
    fault: std::sync::atomic::AtomicU8,
    start: std::time::Instant,
    /// Milliseconds after `start` + 1 when the body ended (0: not yet).
    ended: AtomicU64,
    /// Milliseconds after `start` + 1 when a frame was last taken, or when
    /// the route's `bandwidth` pause of the next one ends (0: none yet).
    moved: AtomicU64,
    /// Milliseconds after `start` + 1 since the body has waited for the
    /// client (0: it does not).
    waiting: AtomicU64,
    /// The HTTP/1.1 backend connection the request went out on, and the
    /// number of its exchange there (see [`BackendCut`]).
    cut: parking_lot::Mutex<Option<(Arc<BackendCut>, u64)>>,
}

/// How the task of an HTTP/1.1 backend connection is told to drop it.
/// hyper ends a connection whose answer nobody waits for anymore only after
/// flushing what it has buffered, which a backend that stopped reading never
/// lets it do; a request given up cuts its connection instead. A cut names
/// the exchange it is meant for, and the connection's task drops the
/// connection only while that exchange is the one it carries: hyper lets a
/// connection go idle once it has read a response to its end, which can be
/// before the proxy has handed that response on, and the connection may
/// carry another client's request by the time the first one is given up.
#[derive(Default)]
pub struct BackendCut {
    notify: tokio::sync::Notify,
    /// The exchange the connection carries (counted from 1 as requests are
    /// sent on it; 0: none yet).
    exchange: AtomicU64,
    /// The latest exchange a cut was asked for (0: none).
    asked: AtomicU64,
}

impl BackendCut {
    /// Numbers a request about to be sent on the connection: the number
    /// of its exchange.
    fn next(&self) -> u64 {
        self.exchange.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Asks for the connection to be dropped if it still carries exchange
    /// `n`.
    fn cut(&self, n: u64) {
        self.asked.fetch_max(n, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Whether a cut was asked for the exchange the connection carries.
    /// Asked by the connection's own task: a request the next exchange sent
    /// meanwhile is given back by hyper as the connection is dropped unsent
    /// (and sent again on another connection), never cut off half-way.
    fn stands(&self) -> bool {
        let asked = self.asked.load(Ordering::SeqCst);
        asked != 0 && asked == self.exchange.load(Ordering::SeqCst)
    }
}

/// How long past `idle_timeout` a request body that waits for its client
/// may go unfailed before it is taken as not asked for (the client's data
/// came, the backend took none): its own stall comes first.
const STALL_GRACE: Duration = Duration::from_secs(1);

impl ClientBody {
    const TOO_LARGE: u8 = 1;
    const STALLED: u8 = 2;
    const BROKE_OFF: u8 = 3;

    fn new() -> ClientBody {
        ClientBody(Arc::new(ClientBodyState {
            fault: std::sync::atomic::AtomicU8::new(0),
            start: std::time::Instant::now(),
            ended: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            cut: parking_lot::Mutex::new(None),
        }))
    }

    /// Sends the request on the HTTP/1.1 backend connection `sender`, as a
    /// new exchange of it that the request can cut. (None on HTTP/2, which
    /// resets a stream given up.)
    fn send_on(
        &self,
        sender: &mut Pooled,
        req: Request<ProxyBody>,
    ) -> impl std::future::Future<
        Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<ProxyBody>>>,
    > {
        let n = sender.cut.next();
        *self.0.cut.lock() = Some((Arc::clone(&sender.cut), n));
        sender.sender.try_send_request(req)
    }

    /// Drops the HTTP/1.1 backend connection the request went out on, if
    /// it still carries the request's exchange: the request was given up.
    fn cut(&self) {
        if let Some((c, n)) = &*self.0.cut.lock() {
            c.cut(*n);
        }
    }

    /// `t` as stored: milliseconds after `start` + 1.
    fn stamp(&self, t: std::time::Instant) -> u64 {
        let ms = t.saturating_duration_since(self.0.start).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
    }

    /// A stored time (`None` for 0).
    fn at(&self, stamp: u64) -> Option<tokio::time::Instant> {
        let ms = stamp.checked_sub(1)?;
        Some(tokio::time::Instant::from_std(
            self.0.start + Duration::from_millis(ms),
        ))
    }

    fn set(&self, why: u8) {
        let _ = self
            .0
            .fault
            .compare_exchange(0, why, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn failed(&self) -> bool {
        self.0.fault.load(Ordering::Relaxed) != 0
    }

    /// Notes that the body has ended (the first time counts).
    fn end(&self) {
        if self.0.ended.load(Ordering::Relaxed) == 0 {
            let t = self.stamp(std::time::Instant::now());
            self.0.ended.store(t, Ordering::Relaxed);
        }
    }

    /// When the body ended, if it has.
    fn ended_at(&self) -> Option<tokio::time::Instant> {
        self.at(self.0.ended.load(Ordering::Relaxed))
    }

    /// Notes that the backend took a frame (at `t`: now, or the end of the
    /// pause it waits for), so the body no longer waits for the client.
    fn moved(&self, t: std::time::Instant) {
        self.0.moved.store(self.stamp(t), Ordering::Relaxed);
        self.0.waiting.store(0, Ordering::Relaxed);
    }

    /// Notes that the body waits for the client from now.
    fn wait(&self) {
        let t = self.stamp(std::time::Instant::now());
        self.0.waiting.store(t, Ordering::Relaxed);
    }

    /// When the unfinished body is taken as held up by the backend: `quiet`
    /// after a frame was last taken (or after `begun`, when the request
    /// went out); while it waits for the client, not before its own stall
    /// at `idle` has had its turn.
    fn stuck_at(
        &self,
        begun: tokio::time::Instant,
        quiet: Duration,
        idle: Duration,
    ) -> tokio::time::Instant {
        let moved = self.at(self.0.moved.load(Ordering::Relaxed));
        let at = moved.map_or(begun, |m| m.max(begun)) + quiet;
        match self.at(self.0.waiting.load(Ordering::Relaxed)) {
            Some(w) => at.max(w + idle + STALL_GRACE),
            None => at,
        }
    }

    /// What the body's failure is counted as, when it failed.
    fn kind(&self) -> Option<ErrorKind> {
        match self.0.fault.load(Ordering::Relaxed) {
            0 => None,
            Self::TOO_LARGE => Some(ErrorKind::BodyTooLarge),
            Self::STALLED => Some(ErrorKind::ClientTimeout),
            _ => Some(ErrorKind::ClientAborted),
        }
    }

    /// The answer for the client, when its body failed (counted already,
    /// by the body as it failed).
    fn answer(&self) -> Option<Response<ProxyBody>> {
        let (kind, status, msg) = match self.kind()? {
            ErrorKind::BodyTooLarge => return Some(too_large()),
            ErrorKind::ClientTimeout => (
                ErrorKind::ClientTimeout,
                StatusCode::REQUEST_TIMEOUT,
                "408 request timeout: the request body stalled",
            ),
            _ => (
                ErrorKind::ClientAborted,
                StatusCode::BAD_REQUEST,
                "400 bad request: the request body broke off",
            ),
        };
        let mut r = text(status, msg);
        r.extensions_mut().insert(kind);
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Some(r)
    }
}

/// What the HTTP handler knows about the client connection.
pub struct ConnInfo {
    /// Client address.
    pub client: SocketAddr,
    /// True on a terminated TLS connection.
    pub tls: bool,
    /// The route chosen by SNI on TLS connections.
    pub sni_route: Option<Arc<Route>>,
    /// The client is a trusted proxy (`[proxy] trusted_proxies`): its
    /// forwarding headers are kept and appended to, not replaced.
    pub trusted: bool,
    /// Backend connections of this client connection's finished requests,
    /// kept for its next ones (newest last, at most `held_max`).
    held: parking_lot::Mutex<Vec<Held>>,
    held_max: usize,
    /// The connection's place under `[limits] max_connections`, also held
    /// by an upgraded connection's splice.
    slot: Arc<crate::proxy::server::ConnSlot>,
    /// Whether the client was cut off for taking nothing of its responses
    /// (see [`crate::proxy::stall`]).
    stall: Arc<Stall>,
    /// The client's socket, asked by the watches of what own its IO (the
    /// connection's, an upgraded connection's splice).
    queue: Option<stall::SendQueue>,
}

/// Backend connections an HTTP/2 client connection keeps between its
/// requests (one per stream it runs at once, up to this many).
const H2_HELD: usize = 32;

impl ConnInfo {
    /// `sequential`: the client connection is HTTP/1.1 (one request at a time,
    /// so one backend connection kept); HTTP/2 keeps up to `H2_HELD`.
    /// `trusted`: see [`ConnInfo::trusted`]. `queue`: the client's TCP
    /// socket, when the connection is one.
    pub fn new(
        client: SocketAddr,
        tls: bool,
        sni_route: Option<Arc<Route>>,
        sequential: bool,
        trusted: bool,
        slot: Arc<crate::proxy::server::ConnSlot>,
        queue: Option<stall::SendQueue>,
    ) -> Self {
        ConnInfo {
            client,
            tls,
            sni_route,
            trusted,
            held: parking_lot::Mutex::new(Vec::new()),
            held_max: if sequential { 1 } else { H2_HELD },
            slot,
            stall: Stall::conn(),
            queue,
        }
    }

    /// The connection's place under `[limits] max_connections`.
    pub(crate) fn slot(&self) -> &Arc<crate::proxy::server::ConnSlot> {
        &self.slot
    }

    /// The client's socket (see [`stall::SendQueue`]).
    pub fn queue(&self) -> Option<stall::SendQueue> {
        self.queue
    }

    /// The connection's watch for a client that takes nothing of its
    /// responses.
    pub fn stall(&self) -> &Arc<Stall> {
        &self.stall
    }

    /// The watch of the exchange running now: its HTTP/2 stream's, else
    /// the connection's.
    fn sending(&self) -> Arc<Stall> {
        stall::current_stream().unwrap_or_else(|| Arc::clone(&self.stall))
    }

    /// A kept backend connection that can carry a request planned as `plan`
    /// on the backends `up` (newest first).
    fn reuse(&self, up: &Arc<Upstreams>, plan: &[usize]) -> Option<(Pooled, Backend, Lease)> {
        let mut held = self.held.lock();
        let i = held.iter().rposition(|h| up.fits(plan, h))?;
        let h = held.swap_remove(i);
        drop(held);
        up.reuse_held(plan, h).ok()
    }

    /// Keeps `h` for a later request, or gives it to the pool.
    fn keep(&self, h: Held) {
        if !h.may_keep() {
            h.release();
            return;
        }
        let mut held = self.held.lock();
        held.push(h);
        let out = if held.len() > self.held_max {
            Some(held.remove(0))
        } else {
            None
        };
        drop(held);
        if let Some(old) = out {
            old.release();
        }
    }
}

impl Drop for ConnInfo {
    fn drop(&mut self) {
        for h in std::mem::take(self.held.get_mut()) {
            h.release();
        }
    }
}

/// The requests of one HTTP/2 client connection: how many are open (until
/// their response body ends or is dropped) and when the last one ended, so
/// that a connection with none open is closed once idle as long as an
/// HTTP/1.1 connection between requests.
pub struct Streams {
    open: AtomicUsize,
    start: std::time::Instant,
    /// Milliseconds after `start` the last request ended (0: none yet).
    idle_since: AtomicU64,
}

impl Streams {
    /// A connection's, starting now.
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            open: AtomicUsize::new(0),
            start: std::time::Instant::now(),
            idle_since: AtomicU64::new(0),
        })
    }

    /// Marks a request open until the returned guard is dropped.
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        StreamGuard(Arc::clone(self))
    }

    /// How long no request has been open, `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::Relaxed));
        Some(self.start.elapsed().saturating_sub(since))
    }
}

/// One open request of [`Streams`].
pub struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since.store(ms, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The largest DATA frame an HTTP/2 response body hands hyper (the
/// protocol's default frame size, so the frames on the wire are the same):
/// hyper asks for the next one only once the client's window has let most
/// of the last one go, and a client that takes nothing of one for
/// `idle_timeout` has its stream reset (see [`crate::proxy::stall`]). A
/// large frame (an HTTP/1.1 backend's reads can be hundreds of KiB) would
/// hold a slow client that does read to the same time for all of it.
const H2_FRAME: usize = 16 * 1024;

/// An HTTP/2 response body: keeps its request open in [`Streams`] until it
/// ends, hands hyper its data in frames of at most [`H2_FRAME`], and notes
/// what it does in its stream's watch.
pub struct TrackedBody {
    inner: ProxyBody,
    _open: StreamGuard,
    /// The stream's watch (none outside a stream run by
    /// [`stall::StreamExec`]).
    stall: Option<Arc<Stall>>,
    /// Data frames handed out.
    frames: u64,
    /// What is left of a data frame over [`H2_FRAME`].
    rest: Bytes,
}

impl TrackedBody {
    /// Wraps `inner`.
    pub fn new(inner: ProxyBody, open: StreamGuard) -> TrackedBody {
        TrackedBody {
            inner,
            _open: open,
            stall: stall::current_stream(),
            frames: 0,
            rest: Bytes::new(),
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = if self.rest.is_empty() {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(mut d) => {
                        if d.len() > H2_FRAME {
                            self.rest = d.split_off(H2_FRAME);
                        }
                        Poll::Ready(Some(Ok(Frame::data(d))))
                    }
                    Err(f) => Poll::Ready(Some(Ok(f))),
                },
                r => r,
            }
        } else {
            let n = self.rest.len().min(H2_FRAME);
            Poll::Ready(Some(Ok(Frame::data(self.rest.split_to(n)))))
        };
        if let Some(s) = &self.stall {
            match &r {
                Poll::Ready(Some(Ok(f))) if f.is_data() => {
                    let n = self.frames + 1;
                    s.handed(n);
                    self.frames = n;
                }
                Poll::Pending => s.asked(self.frames),
                Poll::Ready(_) => s.done(self.frames),
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        plus_held(self.inner.size_hint(), self.rest.len() as u64)
    }
}

/// A body's size hint with `held` bytes it holds back on top.
fn plus_held(h: SizeHint, held: u64) -> SizeHint {
    if held == 0 {
        return h;
    }
    let mut out = SizeHint::new();
    out.set_lower(h.lower().saturating_add(held));
    if let Some(u) = h.upper() {
        out.set_upper(u.saturating_add(held));
    }
    out
}

/// Counts DATA bytes of a streamed body into `bytes_in` or `bytes_out`, and
/// paces them to the route's `bandwidth`.
struct CountedBody<B> {
    inner: B,
    counters: Arc<Counters>,
    inbound: bool,
    throttle: Arc<Throttle>,
    pause: Pause,
    /// A frame that waits for its pause: a body frame can be large (hyper
    /// reads what the socket has), so it is held until the route's rate has
    /// paid for it rather than passed at once.
    held: Option<Frame<Bytes>>,
    /// Kept until the body is dropped: the backend lease (least-connections)
    /// and the route's connection slot.
    _hold: Option<Hold>,
    /// Request bodies of routes with `max_body_size`.
    limit: Option<BodyLimit>,
    /// Request bodies: set when the client's body fails.
    fault: Option<ClientBody>,
    /// Request bodies: what their trailers may not carry on.
    trailers: Option<TrailerRules>,
    /// Response bodies: the request's body, whose failure (counted as it
    /// failed) cuts the response off too.
    request: Option<ClientBody>,
    /// A body that waits this long for its peer fails (zero: never), so a
    /// backend or client gone silent mid-body does not hold the exchange
    /// (its backend connection, the route's slot) for good.
    idle: Duration,
    /// The body has waited for its peer since `timer` was set: from the
    /// first `Pending` after it last gave a frame, not from the frame (the
    /// time its reader did not ask is not the peer's silence).
    waiting: bool,
    /// Runs out `idle` after the body began waiting.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Response bodies: the watch of the client connection (HTTP/2: of the
    /// stream) the response goes out on. A body dropped with its client
    /// cut off for taking nothing counts it.
    sending: Option<Arc<Stall>>,
}

impl<B> CountedBody<B> {
    /// Whether the body, asked for a frame it does not have, has waited
    /// `idle` for it.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            if let Some(f) = &self.fault {
                f.wait();
            }
            if !self.idle.is_zero() {
                let deadline = tokio::time::Instant::now() + self.idle;
                match &mut self.timer {
                    Some(t) => t.as_mut().reset(deadline),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
            }
        }
        match &mut self.timer {
            Some(t) => std::future::Future::poll(t.as_mut(), cx).is_ready(),
            None => false,
        }
    }

    /// Notes a frame taken (when `until` is set: one held until then by
    /// the route's `bandwidth`).
    fn moved(&mut self, until: Option<std::time::Instant>) {
        self.waiting = false;
        if let Some(f) = &self.fault {
            f.moved(until.unwrap_or_else(std::time::Instant::now));
        }
    }
}

/// A backend lease and a route slot, released together.
type Hold = (Lease, Option<OwnedSemaphorePermit>);

impl<B> Drop for CountedBody<B> {
    /// A request body is done with once dropped: hyper drops one after its
    /// end or its trailers, and unread the streamed body of a GET or HEAD
    /// (which it sends without): `response_timeout` runs from here then,
    /// not never.
    fn drop(&mut self) {
        if let Some(f) = &self.fault {
            f.end();
        }
        if self.sending.as_ref().is_some_and(|s| s.take_cut()) {
            self.counters.error(ErrorKind::ClientNotReading);
            // An HTTP/1.1 backend connection still taking the request's
            // body goes too (a response dropped unread closes its own, once
            // it has flushed what it holds of the request); one that has
            // gone on to another exchange stays.
            if let Some(r) = &self.request {
                r.cut();
            }
        }
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.pause.is_some() {
            std::task::ready!(poll_pause(&mut self.pause, cx));
        }
        if let Some(f) = self.held.take() {
            self.moved(None);
            return Poll::Ready(Some(Ok(f)));
        }
        let r = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                if let Some(f) = &self.fault {
                    f.set(ClientBody::BROKE_OFF);
                    self.counters.error(ErrorKind::ClientAborted);
                    return Poll::Ready(Some(Err(e)));
                }
                // A response cut off: by the backend (a reset, a close, an
                // HTTP/2 RST_STREAM), or after the request's body failed.
                debug!(error = %e, "response body broke off");
                let failed = match self.request.as_ref().and_then(ClientBody::kind) {
                    Some(k) => BodyFailed(k, "the request body failed"),
                    None => {
                        self.counters.error(ErrorKind::BackendAborted);
                        BodyFailed(
                            ErrorKind::BackendAborted,
                            "the backend broke off its response",
                        )
                    }
                };
                return Poll::Ready(Some(Err(Box::new(failed))));
            }
            Poll::Ready(r) => {
                self.moved(None);
                if r.is_none() {
                    if let Some(b) = &self.fault {
                        b.end();
                    }
                }
                let mut r = r.map(|f| f.map_err(Into::into));
                if let (Some(Ok(f)), Some(rules)) = (&mut r, &self.trailers) {
                    if let Some(t) = f.trailers_mut() {
                        rules.clean(t);
                    }
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if !self.stalled(cx) {
                    return Poll::Pending;
                }
                // Counted here: the exchange may have its answer already.
                let kind = if let Some(f) = &self.fault {
                    f.set(ClientBody::STALLED);
                    ErrorKind::ClientTimeout
                } else {
                    ErrorKind::BackendTimeout
                };
                self.counters.error(kind);
                return Poll::Ready(Some(Err(Box::new(BodyFailed(
                    kind,
                    "body stalled: nothing for idle_timeout",
                )))));
            }
        };
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                let n = d.len() as u64;
                if let Some(l) = &mut self.limit {
                    if n > l.left {
                        // Counted here: the backend may have answered already,
                        // and then its answer is what gets cut off.
                        if let Some(f) = &self.fault {
                            f.set(ClientBody::TOO_LARGE);
                        }
                        self.counters.error(ErrorKind::BodyTooLarge);
                        return Poll::Ready(Some(Err(Box::new(BodyFailed(
                            ErrorKind::BodyTooLarge,
                            "request body over the route's max_body_size",
                        )))));
                    }
                    l.left -= n;
                }
                if self.inbound {
                    self.counters.add_in(n);
                } else {
                    self.counters.add_out(n);
                }
                let up = self.inbound;
                self.pause = pause_after(&self.throttle, up, n);
                if let Some(p) = &self.pause {
                    // The route's doing, not the backend's: the frame is
                    // as good as taken until the pause ends.
                    let until = p.deadline().into_std();
                    self.moved(Some(until));
                    if let Poll::Ready(Some(Ok(f))) = r {
                        self.held = Some(f);
                    }
                    // Noted as taken at the pause's end, which has passed
                    // when the pause is over at once.
                    std::task::ready!(poll_pause(&mut self.pause, cx));
                    return Poll::Ready(self.held.take().map(Ok));
                }
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        let end = self.held.is_none() && self.inner.is_end_stream();
        if end {
            if let Some(b) = &self.fault {
                b.end();
            }
        }
        end
    }
    fn size_hint(&self) -> SizeHint {
        let held = self
            .held
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        plus_held(self.inner.size_hint(), held)
    }
}

/// A response body from a backend, to the request whose body is `request`,
/// going out on the connection or stream `sending` watches.
fn counted(
    b: Incoming,
    counters: Arc<Counters>,
    hold: Option<Hold>,
    throttle: Arc<Throttle>,
    idle: Duration,
    request: ClientBody,
    sending: Arc<Stall>,
) -> ProxyBody {
    CountedBody {
        inner: b,
        counters,
        inbound: false,
        throttle,
        pause: None,
        held: None,
        _hold: hold,
        limit: None,
        fault: None,
        trailers: None,
        request: Some(request),
        idle,
        waiting: false,
        timer: None,
        sending: Some(sending),
    }
    .boxed()
}

/// A request body from a client, whose trailers go on as `trailers` lets
/// them.
fn limited(
    b: Incoming,
    counters: Arc<Counters>,
    throttle: Arc<Throttle>,
    limit: Option<BodyLimit>,
    fault: ClientBody,
    trailers: TrailerRules,
    idle: Duration,
) -> ProxyBody {
    CountedBody {
        inner: b,
        counters,
        inbound: true,
        throttle,
        pause: None,
        held: None,
        _hold: None,
        limit,
        fault: Some(fault),
        trailers: Some(trailers),
        request: None,
        idle,
        waiting: false,
        timer: None,
        sending: None,
    }
    .boxed()
}

/// An empty body (health probes).
pub fn empty_body() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A small plain-text response.
pub fn text(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An error answer, counted; the kind rides along as a response extension
/// for the access log.
fn err(counters: &Counters, kind: ErrorKind, status: StatusCode, msg: &str) -> Response<ProxyBody> {
    counters.error(kind);
    let mut r = text(status, msg);
    r.extensions_mut().insert(kind);
    r
}

/// The body length a request announces: its `Content-Length`, read as hyper
/// reads it (a comma-separated list, or several fields, of one same value).
fn announced_length(h: &HeaderMap) -> Option<u64> {
    let mut len = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().ok()?.split(',') {
            // Digits only: hyper refuses a sign.
            let part = part.trim();
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = part.parse().ok()?;
            if len.is_some_and(|l| l != n) {
                return None;
            }
            len = Some(n);
        }
    }
    len
}

/// The answer to a request body over the route's `max_body_size` (counted
/// by the caller, or by the body as it went over).
fn too_large() -> Response<ProxyBody> {
    let mut r = text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "413 content too large: the request body is over this route's limit",
    );
    r.extensions_mut().insert(ErrorKind::BodyTooLarge);
    // The rest of the body is not read: the connection cannot carry another
    // request.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A response body that notes its size in the access-log record and writes
/// the record when the body is done with (sent, abandoned by the client, or
/// cut off with a client that took nothing of it: `sending`).
struct LoggedBody {
    inner: ProxyBody,
    rec: Option<Record>,
    bytes: u64,
    sending: Arc<Stall>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(BodyFailed(kind, _)) = e.downcast_ref() {
                    let kind = kind.as_str();
                    Record::note(&mut self.rec, |e| {
                        e.error.get_or_insert(kind);
                    });
                }
            }
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let n = self.bytes;
        let cut = self.sending.was_cut();
        Record::note(&mut self.rec, |e| {
            e.bytes_out = n;
            if cut {
                e.error.get_or_insert(ErrorKind::ClientNotReading.as_str());
            }
        });
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        _ => "HTTP/1.1",
    }
}

/// Handles one request: route, rewrite, forward, relay; with `[proxy]
/// access_log`, one line per request when its response body is done.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut rec = Record::start(&shared, conn.client, LogKind::Http, conn.tls);
    if rec.is_none() {
        return proxy_request(shared, conn, req, &mut rec).await;
    }
    Record::note(&mut rec, |e| {
        e.method = Some(req.method().as_str().to_string());
        e.path = Some(clip_path(req.uri().path()));
        e.proto = Some(version_str(req.version()));
        e.host = request_host(&req).map(|(_, h)| h.as_str().to_string());
    });
    let sending = conn.sending();
    let Ok(resp) = proxy_request(shared, conn, req, &mut rec).await;
    let status = resp.status().as_u16();
    let error = resp.extensions().get::<ErrorKind>().map(|k| k.as_str());
    Record::note(&mut rec, |e| {
        e.status = Some(status);
        e.error = error;
    });
    let (parts, body) = resp.into_parts();
    let body = LoggedBody {
        inner: body,
        rec,
        bytes: 0,
        sending,
    };
    Ok(Response::from_parts(parts, BodyExt::boxed(body)))
}

/// Why the hub refuses to pass `req` on, whatever its route: a `CONNECT`
/// (the hub tunnels nothing for clients; sent on it would reach the backend
/// as a broken request), more than one `Host` (RFC 9112 §3.2: a proxy in
/// front that reads the other one would judge another host), an HTTP/1.1
/// request without one (RFC 9112 §3.2: 400; HTTP/1.0 needs none), a
/// transfer coding other than `chunked` (RFC 9112 §6.1: 501; hyper takes
/// off the chunked framing only, and the backend would get the body still
/// coded with nothing to say so), or an HTTP/2 request whose `host`
/// disagrees with its authority (RFC 9113 §8.3.1). An HTTP/1.1 request in
/// absolute form goes by its target, whatever its `Host` (RFC 9112 §3.2.2).
fn malformed<B>(req: &Request<B>) -> Option<(StatusCode, &'static str)> {
    if req.method() == http::Method::CONNECT && !websocket_over_h2(req) {
        return Some((
            StatusCode::METHOD_NOT_ALLOWED,
            "405 method not allowed: the hub does not tunnel CONNECT",
        ));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Some((
            StatusCode::BAD_REQUEST,
            "400 bad request: more than one Host header",
        ));
    }
    if first.is_none() && req.version() == Version::HTTP_11 {
        return Some((
            StatusCode::BAD_REQUEST,
            "400 bad request: an HTTP/1.1 request needs a Host header",
        ));
    }
    if !chunked_only(req.headers()) {
        return Some((
            StatusCode::NOT_IMPLEMENTED,
            "501 not implemented: the hub decodes no transfer coding but chunked",
        ));
    }
    if req.version() >= Version::HTTP_2 {
        if let (Some(h), Some(a)) = (first, req.uri().authority()) {
            if !same_authority(h.to_str().unwrap_or_default(), a.as_str()) {
                return Some((
                    StatusCode::BAD_REQUEST,
                    "400 bad request: the Host header disagrees with the request's authority",
                ));
            }
        }
    }
    None
}

/// Whether a message's `Transfer-Encoding`, when it has one, is `chunked`
/// alone: the one transfer coding the hub takes off (hyper does), and that
/// is not passed on (the header is hop-by-hop).
fn chunked_only(h: &HeaderMap) -> bool {
    let mut codings = Vec::new();
    for v in h.get_all(header::TRANSFER_ENCODING) {
        let Ok(s) = v.to_str() else {
            return false;
        };
        codings.extend(s.split(',').map(str::trim).filter(|c| !c.is_empty()));
    }
    match codings.as_slice() {
        [] => !h.contains_key(header::TRANSFER_ENCODING),
        [c] => c.eq_ignore_ascii_case("chunked"),
        _ => false,
    }
}

/// Whether a backend's response (`status`, `h`) to a request (a `HEAD`
/// when `head`) frames its body with a transfer coding other than
/// `chunked`: hyper would hand its body on still coded (or, without
/// `chunked`, read to the connection's end), and the header that says so
/// goes as hop-by-hop. Answers without a body are not framed by it.
fn other_coding(head: bool, status: StatusCode, h: &HeaderMap) -> bool {
    let bodiless = head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    !bodiless && !chunked_only(h)
}

/// Leaves a message one `Content-Length` field of one value where it came
/// with a list of one same value (`12, 12`) or several such fields: hyper
/// reads them as that length, but an HTTP/2 peer refuses them (and resets
/// the stream). One that is no valid length (possible in an answer to a
/// `HEAD`, whose length hyper does not read) goes.
fn one_length(h: &mut HeaderMap) {
    let mut all = h.get_all(header::CONTENT_LENGTH).iter();
    let plain = |v: &HeaderValue| {
        !v.is_empty()
            && v.as_bytes().iter().all(u8::is_ascii_digit)
            && v.to_str().is_ok_and(|s| s.parse::<u64>().is_ok())
    };
    match (all.next(), all.next()) {
        (None, _) => return,
        (Some(v), None) if plain(v) => return,
        _ => {}
    }
    match announced_length(h) {
        Some(n) => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            h.remove(header::CONTENT_LENGTH);
        }
    }
}

/// Readies the head of a backend's response for the client: HTTP/1.1
/// (hyper answers an HTTP/2 client in HTTP/2 whatever the version says; an
/// HTTP/1.0 backend's would cost an HTTP/1.1 client its keep-alive),
/// without hop-by-hop headers (`keep`: the `Upgrade` of a switch), with one
/// `Content-Length`, and with the route's `response_headers`.
fn response_head(
    parts: &mut http::response::Parts,
    keep: Option<HeaderValue>,
    edits: &crate::proxy::settings::HeaderEdits,
) {
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, keep);
    one_length(&mut parts.headers);
    edit_headers(&mut parts.headers, edits);
}

/// Whether two authorities (`host[:port]`) name the same host, in any case,
/// with the same port or one of them without (a client may leave the
/// default port out of one and not the other).
fn same_authority(a: &str, b: &str) -> bool {
    fn split(s: &str) -> (&str, Option<&str>) {
        match s.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((h, p)) => (h, p.strip_prefix(':')),
                None => (s, None),
            },
            None => match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            },
        }
    }
    let ((ha, pa), (hb, pb)) = (split(a), split(b));
    !ha.is_empty()
        && ha.eq_ignore_ascii_case(hb)
        && match (pa, pb) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// The request's authority (`host[:port]` as sent) and its host name.
fn request_host<B>(req: &Request<B>) -> Option<(String, DomainName)> {
    let auth = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => req.headers().get(header::HOST)?.to_str().ok()?.to_string(),
    };
    let host = if auth.starts_with('[') {
        return None; // IPv6 literal: no route
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => auth.as_str(),
        }
    };
    let name = DomainName::parse(host).ok()?;
    Some((auth, name))
}

/// Headers of one connection, never passed on. `Trailer` is not one of
/// them (RFC 9110 §6.6.2): it names the trailer fields a chunked message
/// ends with, and hyper sends on only the trailers it names. The
/// `Proxy-Authorization` and `Proxy-Authenticate` of a proxy in between
/// are its own; `Proxy` is no standard header, but CGI hands it to the
/// application as `HTTP_PROXY`, its outgoing proxy ("httpoxy").
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (the fixed list and those named in `Connection`),
/// and the `Content-Length` of a message framed by `Transfer-Encoding` (RFC
/// 9112 §6.3: it is not the length of the body passed on).
/// With `upgrade`, `Connection: upgrade` and the `Upgrade` value are kept.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    for n in connection_listed(h) {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
}

/// The header names a message's `Connection` header lists.
fn connection_listed(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// What a client's request trailers may not carry on to the backend: the
/// fields the rules for its headers take out or set. (hyper sends an
/// HTTP/1.1 backend the trailers the request's `Trailer` header names, an
/// HTTP/2 backend all of them; a backend that reads them as headers would
/// otherwise take a client's `X-Forwarded-For` or `X-Forwarded-User` for
/// the hub's.)
struct TrailerRules {
    /// The names the request's `Connection` header lists, the headers of
    /// the route's `forward_auth` service and `request_headers`, and on a
    /// route with `basic_auth_file` the credentials.
    names: Vec<HeaderName>,
}

impl TrailerRules {
    /// The rules for a request with the headers `head` (as the client sent
    /// them), on a route whose `forward_auth` service sets `auth`, whose
    /// `request_headers` are `edits`, and which takes the client's
    /// credentials for itself when `basic_auth`.
    fn new(
        head: &HeaderMap,
        auth: &[HeaderName],
        edits: &crate::proxy::settings::HeaderEdits,
        basic_auth: bool,
    ) -> TrailerRules {
        let mut names = connection_listed(head);
        names.extend(auth.iter().cloned());
        names.extend(edits.iter().map(|(n, _)| n.clone()));
        if basic_auth {
            names.push(header::AUTHORIZATION);
        }
        TrailerRules { names }
    }

    /// Takes out of the trailers `t` the hop-by-hop fields, the forwarding
    /// ones (see [`is_forwarding`]), those that frame or address a message
    /// (`Host`, `Content-Length`, `Trailer`), and those of the rules' names
    /// (also spelled with `_` for `-`).
    fn clean(&self, t: &mut HeaderMap) {
        let framing = [header::HOST, header::CONTENT_LENGTH, header::TRAILER];
        let gone: Vec<HeaderName> = t
            .keys()
            .filter(|k| {
                HOP_BY_HOP.contains(k)
                    || framing.contains(k)
                    || is_forwarding(k)
                    || self
                        .names
                        .iter()
                        .any(|n| same_dashed(k.as_str(), n.as_str()))
            })
            .cloned()
            .collect();
        for n in gone {
            t.remove(n);
        }
    }
}

/// HTTP/2 clients send each cookie as a header of its own (RFC 9113
/// §8.2.3); an HTTP/1.1 backend gets them as one `Cookie` header, joined
/// with `; `, as the RFC asks of a hop to HTTP/1.1.
pub(crate) fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in h.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(mut v) = HeaderValue::from_bytes(&joined) {
        v.set_sensitive(true);
        h.insert(header::COOKIE, v);
    }
}

/// Takes `names` out of the `Connection` header's list (which names the
/// headers to drop at the next hop), keeping its other tokens.
fn unlist_hop_by_hop(h: &mut HeaderMap, names: &[HeaderName]) {
    if names.is_empty() || !h.contains_key(header::CONNECTION) {
        return;
    }
    let tokens: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !names.iter().any(|n| n.as_str().eq_ignore_ascii_case(t)))
        .map(str::to_string)
        .collect();
    h.remove(header::CONNECTION);
    if let Ok(v) = HeaderValue::from_str(&tokens.join(", ")) {
        if !tokens.is_empty() {
            h.insert(header::CONNECTION, v);
        }
    }
}

/// Sets (replacing every value of the name) or removes a route's headers.
fn edit_headers(h: &mut HeaderMap, edits: &crate::proxy::settings::HeaderEdits) {
    for (name, value) in edits {
        match value {
            Some(v) => {
                h.insert(name.clone(), v.clone());
            }
            None => {
                h.remove(name);
            }
        }
    }
}

/// The `Upgrade` value if this is an HTTP/1.1 upgrade request.
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    // Never h2c: after it the client would speak HTTP/2 straight to the
    // backend, past the hub's per-request rules (paths, authentication,
    // headers) for every request after the first ("h2c smuggling").
    let v = req.headers().get(header::UPGRADE)?;
    let kept: Vec<&str> = v
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|t| {
            let proto = t.split('/').next().unwrap_or_default();
            !t.is_empty() && !proto.eq_ignore_ascii_case("h2c")
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Whether `req` opens a WebSocket over HTTP/2 (RFC 8441: an extended
/// `CONNECT` whose `:protocol` is `websocket`, which the hub offers with
/// `SETTINGS_ENABLE_CONNECT_PROTOCOL`). The hub passes it to the backend as
/// an HTTP/1.1 upgrade; any other `CONNECT` is refused.
fn websocket_over_h2<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        && req.version() == Version::HTTP_2
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// The `Sec-WebSocket-Key` of the HTTP/1.1 upgrade a WebSocket over HTTP/2
/// becomes (RFC 8441 §5: the HTTP/2 request has none; the backend's
/// `Sec-WebSocket-Accept` must answer this one).
fn websocket_key() -> String {
    let mut random = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut random);
    crate::carrier::ws::client_key(random)
}

/// Turns the head of a WebSocket over HTTP/2 into the HTTP/1.1 opening
/// handshake (RFC 8441 §5; `strip_hop_by_hop` adds `Connection` and
/// `Upgrade`): `GET`, the key, and version 13 unless the client named one
/// (a backend that speaks another answers `426` itself).
fn websocket_request_head(parts: &mut http::request::Parts, key: &str) {
    parts.method = http::Method::GET;
    parts.extensions.remove::<hyper::ext::Protocol>();
    if let Ok(k) = HeaderValue::from_str(key) {
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, k);
    }
    if !parts.headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
        parts.headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
}

/// Whether a backend's `101` to the HTTP/1.1 handshake made of a WebSocket
/// over HTTP/2 accepts it: `Sec-WebSocket-Accept` answers `key` (anything
/// else did not take part in the WebSocket handshake the client asked for).
fn websocket_accepted(h: &HeaderMap, key: &str) -> bool {
    h.get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes() == crate::carrier::ws::accept_for(key).as_bytes())
}

/// Whether a (trusted) proxy in front says the client came over https: the
/// first value of `X-Forwarded-Proto`, the client's side.
fn forwarded_https(h: &HeaderMap) -> bool {
    h.get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(',').next())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
}

/// Whether a backend's `101` answers what the client asked for: an upgrade
/// it requested (`asked`, the `Upgrade` tokens passed on), to one of those
/// protocols. Anything else would switch a client that did not ask, or to
/// another protocol than it speaks next.
fn switch_answers(asked: Option<&HeaderValue>, answer: Option<&HeaderValue>) -> bool {
    let (Some(asked), Some(answer)) = (asked, answer) else {
        return false;
    };
    let (Ok(asked), Ok(answer)) = (asked.to_str(), answer.to_str()) else {
        return false;
    };
    let answer = answer.trim();
    !answer.is_empty()
        && asked
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(answer))
}

/// Appends `value` to header `name`'s list (its lines joined into one), as
/// bytes: a value a client wrote in bytes that are not text (which HTTP/1.1
/// lets through as opaque) stays as it came, and the hub's entry is still
/// the last, never the only one.
fn append(h: &mut HeaderMap, name: HeaderName, value: &str) {
    let mut joined: Vec<u8> = Vec::new();
    for v in h.get_all(&name) {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(value.as_bytes());
    match HeaderValue::from_bytes(&joined) {
        Ok(v) => {
            h.insert(name, v);
        }
        // Not reached (every part is a valid value); the hub's own entry
        // alone rather than none.
        Err(_) => {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        }
    }
}

/// Whether header names `a` and `b` (lowercase) are the same with `_` read
/// as `-`, as CGI, PHP, WSGI and Rails read them (`X_Real_IP` is their
/// `HTTP_X_REAL_IP` as much as `X-Real-IP` is).
fn same_dashed(a: &str, b: &str) -> bool {
    let dash = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}

/// A header that names the client, its scheme or host to a backend:
/// `Forwarded`, `X-Real-IP` and every `X-Forwarded-*`, also spelled with
/// `_` for `-`.
fn is_forwarding(name: &HeaderName) -> bool {
    // Header names are held in lowercase.
    let n = name.as_str();
    const PREFIX: &str = "x-forwarded-";
    n == "forwarded"
        || same_dashed(n, "x-real-ip")
        || n.get(..PREFIX.len())
            .is_some_and(|p| same_dashed(p, PREFIX))
}

/// Puts the `forward_auth` service's headers (`values`, of the names
/// `names`) on a request, after its forwarding headers: every header the
/// request holds of those names (also spelled with `_` for `-`) goes first,
/// so that only the service's values reach the backend.
fn set_auth_headers(
    h: &mut HeaderMap,
    names: &[HeaderName],
    values: Vec<(HeaderName, HeaderValue)>,
) {
    let gone: Vec<HeaderName> = h
        .keys()
        .filter(|k| names.iter().any(|n| same_dashed(k.as_str(), n.as_str())))
        .cloned()
        .collect();
    for n in gone {
        h.remove(n);
    }
    for (n, v) in values {
        h.append(n, v);
    }
}

/// Removes every forwarding header (see [`is_forwarding`]).
pub(crate) fn remove_forwarding(h: &mut HeaderMap) {
    if h.keys().any(is_forwarding) {
        let names: Vec<HeaderName> = h.keys().filter(|n| is_forwarding(n)).cloned().collect();
        for n in names {
            h.remove(n);
        }
    }
}

/// Sets X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and Forwarded.
/// From a client that is not a trusted proxy, every forwarding header it
/// sent is removed first (a backend that believes the first address of
/// `X-Forwarded-For` must not get one the client chose); a trusted proxy's
/// `X-Forwarded-For` and `Forwarded` are appended to, and its
/// `X-Forwarded-Proto` and `X-Forwarded-Host` kept.
pub(crate) fn add_forwarding(
    h: &mut HeaderMap,
    client: IpAddr,
    tls: bool,
    authority: &str,
    trusted: bool,
) {
    if !trusted {
        remove_forwarding(h);
    }
    let ip = client.to_canonical();
    let proto = if tls { "https" } else { "http" };
    append(
        h,
        HeaderName::from_static("x-forwarded-for"),
        &ip.to_string(),
    );
    if !h.contains_key("x-forwarded-proto") {
        h.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(proto),
        );
    }
    if !h.contains_key("x-forwarded-host") {
        if let Ok(v) = HeaderValue::from_str(authority) {
            h.insert(HeaderName::from_static("x-forwarded-host"), v);
        }
    }
    let for_ = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let host = authority.replace(['"', '\\'], "");
    append(
        h,
        header::FORWARDED,
        &format!("for={for_};host=\"{host}\";proto={proto}"),
    );
}

type SendError = (ErrorKind, StatusCode, &'static str);

const BAD_EXCHANGE: SendError = (
    ErrorKind::BackendProtocol,
    StatusCode::BAD_GATEWAY,
    "502 bad gateway: the backend broke the HTTP exchange",
);

/// An HTTP/1.1 client connection over `io`.
async fn handshake<IO>(io: IO) -> Result<Pooled, SendError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, ProxyBody>(TokioIo::new(io))
        .await
        .map_err(|_| BAD_EXCHANGE)?;
    let cut = Arc::new(BackendCut::default());
    let task = Arc::clone(&cut);
    tokio::spawn(async move {
        let run = conn.with_upgrades();
        tokio::pin!(run);
        loop {
            tokio::select! {
                r = &mut run => {
                    if let Err(e) = r {
                        debug!(error = %e, "backend connection ended");
                    }
                    return;
                }
                () = task.notify.notified() => {
                    if task.stands() {
                        debug!("backend connection cut: its request was given up");
                        return;
                    }
                }
            }
        }
    });
    Ok(Pooled { sender, cut })
}

/// Awaits a backend's response to a request sent by `sending` (an HTTP/1.1
/// [`ClientBody::send_on`] or an HTTP/2 `try_send_request`). When the
/// connection failed before the request went out (a kept connection the
/// backend had just closed), the request comes back.
async fn send(
    sending: impl std::future::Future<
        Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<ProxyBody>>>,
    >,
    shared: &Shared,
    body: &ClientBody,
) -> Result<Response<Incoming>, (SendError, Option<Request<ProxyBody>>)> {
    // `response_timeout` from the end of the request body: a long upload is
    // not the backend's slowness (a stalled one fails on its own, at
    // `idle_timeout`). Until the body ends, a backend that takes none of it
    // and does not answer for the longer of the two fails: one that stops
    // reading is never asked for more, so the body cannot stall.
    let limit = shared.limits.response_timeout;
    let idle = shared.limits.idle_timeout;
    tokio::pin!(sending);
    let begun = tokio::time::Instant::now();
    let mut deadline = begun + limit;
    let r = loop {
        match tokio::time::timeout_at(deadline, &mut sending).await {
            Ok(r) => break Ok(r),
            Err(_) => {
                deadline = match body.ended_at() {
                    Some(end) => end + limit,
                    None => body.stuck_at(begun, limit.max(idle), idle),
                };
                if deadline <= tokio::time::Instant::now() {
                    // Nothing else can come of the connection.
                    body.cut();
                    break Err(());
                }
            }
        }
    };
    match r {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(mut e)) => {
            let back = e.take_message();
            debug!(error = %e.into_error(), "backend request failed");
            Err((BAD_EXCHANGE, back))
        }
        Err(()) => Err((
            (
                ErrorKind::BackendTimeout,
                StatusCode::GATEWAY_TIMEOUT,
                "504 gateway timeout: the backend did not answer in time",
            ),
            None,
        )),
    }
}

/// A backend that left a request unanswered past `response_timeout` (the
/// client's body did not fail) is skipped for a while when the route has
/// others.
fn note_timeout(up: &Upstreams, addr: std::net::SocketAddr, e: &SendError, body: &ClientBody) {
    if e.0 == ErrorKind::BackendTimeout && !body.failed() && up.note_timeout(addr) {
        debug!(backend = %addr, "backend did not answer in time: marked down");
    }
}

/// The answer to a failed backend connect.
fn connect_error(route: &Route, e: UpstreamError) -> SendError {
    debug!(route = %route.id, error = %e, "no backend connection");
    match e {
        UpstreamError::NoHealthy => (
            ErrorKind::NoHealthyBackend,
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: no healthy backend",
        ),
        UpstreamError::Refused(..) => (
            ErrorKind::BackendRefused,
            StatusCode::BAD_GATEWAY,
            "502 bad gateway: the backend refused the connection",
        ),
        UpstreamError::Timeout(_) => (
            ErrorKind::BackendTimeout,
            StatusCode::GATEWAY_TIMEOUT,
            "504 gateway timeout: the backend did not accept the connection in time",
        ),
        UpstreamError::Local(..) => (
            ErrorKind::OverCapacity,
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the gateway is out of connections",
        ),
        UpstreamError::Tls(_, TlsFailure::NoH2) => (
            ErrorKind::BackendTls,
            StatusCode::BAD_GATEWAY,
            "502 bad gateway: the backend did not agree to HTTP/2 (ALPN h2)",
        ),
        UpstreamError::Tls(_, TlsFailure::Handshake(_)) => (
            ErrorKind::BackendTls,
            StatusCode::BAD_GATEWAY,
            "502 bad gateway: TLS to the backend failed",
        ),
    }
}

/// A connection to a backend: plain, or TLS to an `https://` backend.
enum BackendIo {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// The step after the TCP connect to `backend` (run within the connect
/// timeout, see [`Upstreams::connect_plan_with`]): TLS to an `https://`
/// backend, which must agree to HTTP/2 when `h2`.
async fn backend_io(
    tls: Option<&BackendTlsClient>,
    tcp: tokio::net::TcpStream,
    backend: Backend,
    h2: bool,
) -> Result<BackendIo, TlsFailure> {
    if !crate::proxy::upstream::is_tls(&backend) {
        return Ok(BackendIo::Plain(tcp));
    }
    let Some(tlsc) = tls else {
        // The route's TLS client is made whenever one of its backends is
        // `https://`.
        return Err(TlsFailure::Handshake(std::io::Error::other(
            "no TLS settings for the backend",
        )));
    };
    let tls = tlsc
        .connect(tcp, backend.addr)
        .await
        .map_err(TlsFailure::Handshake)?;
    if h2 && !crate::proxy::upstream::speaks_h2(&tls) {
        return Err(TlsFailure::NoH2);
    }
    Ok(BackendIo::Tls(Box::new(tls)))
}

/// Connects to the backends of `plan` in order (TLS included) until one
/// succeeds.
async fn connect_backend(
    shared: &Shared,
    route: &Route,
    up: &Arc<Upstreams>,
    plan: &[usize],
    h2: bool,
) -> Result<(BackendIo, Backend, Lease), SendError> {
    let tls = route.backend_tls.as_deref();
    up.connect_plan_with(plan, shared.limits.connect_timeout, |tcp, backend| {
        backend_io(tls, tcp, backend, h2)
    })
    .await
    .map_err(|e| connect_error(route, e))
}

/// A new HTTP/2 connection to one backend of `plan` (tried in order), made
/// the backend's shared one.
async fn connect_h2(
    shared: &Shared,
    route: &Route,
    up: &Arc<Upstreams>,
    plan: &[usize],
) -> Result<(H2Sender, Backend, Lease), SendError> {
    let (io, backend, lease) = connect_backend(shared, route, up, plan, true).await?;
    let hs = match io {
        BackendIo::Tls(tls) => crate::proxy::upstream::h2_handshake(*tls).await,
        BackendIo::Plain(tcp) => crate::proxy::upstream::h2_handshake(tcp).await,
    };
    let link = hs.map_err(|e| {
        debug!(route = %route.id, backend = %backend, error = %e, "backend HTTP/2 handshake failed");
        BAD_EXCHANGE
    })?;
    let lease = up.add_h2(&link, lease);
    Ok((link.sender, backend, lease))
}

/// Sends `req` to an HTTP/2 backend: on the shared connection of the first
/// backend of `plan`, when it has a live one, else (or when that connection
/// turns out closed before the request went out) on a new one. Requests that
/// find none wait while one of them connects, then share its connection.
async fn send_h2(
    shared: &Shared,
    route: &Route,
    up: &Arc<Upstreams>,
    mut plan: Vec<usize>,
    mut req: Request<ProxyBody>,
    body: &ClientBody,
) -> Result<(Response<Incoming>, Backend, Lease), SendError> {
    let mut turn = None;
    loop {
        if let Some((mut sender, backend, lease)) = up.shared_h2(&plan) {
            // The turn is for connecting: the next waiter may share this
            // connection too while this request waits for its answer.
            drop(turn.take());
            match send(sender.try_send_request(req), shared, body).await {
                Ok(r) => return Ok((r, backend, lease)),
                Err((_, Some(back))) => {
                    up.drop_h2(&lease);
                    req = back;
                }
                Err((e, None)) => {
                    note_timeout(up, backend.addr, &e, body);
                    return Err(e);
                }
            }
        }
        if turn.is_some() {
            break;
        }
        turn = Some(up.h2_connect_turn(&plan).await);
        // A backend may have been marked down while this request waited.
        up.keep_usable(&mut plan);
    }
    let (mut sender, backend, lease) = connect_h2(shared, route, up, &plan).await?;
    drop(turn);
    match send(sender.try_send_request(req), shared, body).await {
        Ok(r) => Ok((r, backend, lease)),
        Err((e, _)) => {
            // A request body over the limit is the client's doing, not the
            // connection's.
            if !body.failed() {
                up.drop_h2(&lease);
            }
            note_timeout(up, backend.addr, &e, body);
            Err(e)
        }
    }
}

/// True when the client accepts trailers (`TE: trailers`).
fn accepts_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// The client a request from a trusted proxy (`[proxy] trusted_proxies`)
/// comes from, as its `X-Forwarded-For` says: the rightmost address that is
/// not itself a trusted proxy (`trusts`), the proxies in front having
/// appended the one each saw (the left part may be anything the client
/// sent); the leftmost when all are trusted. `None` without the header, or
/// when an address on the way is not one. Only the entries walked are read:
/// what lies left of the client's address (bytes that are not text, say)
/// changes nothing.
fn forwarded_client(h: &HeaderMap, trusts: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    let values: Vec<&[u8]> = h
        .get_all("x-forwarded-for")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let mut client = None;
    for entry in values.iter().rev().flat_map(|v| v.rsplit(|b| *b == b',')) {
        let e = std::str::from_utf8(entry).ok()?.trim();
        // Some proxies add the port (`192.0.2.7:1234`, `[2001:db8::7]:1234`).
        let ip = e
            .parse::<IpAddr>()
            .or_else(|_| e.parse::<SocketAddr>().map(|a| a.ip()))
            .ok()?
            .to_canonical();
        client = Some(ip);
        if !trusts(ip) {
            break;
        }
    }
    client
}

/// Answers a node's WebSocket opening request for a carried tunnel (`101`,
/// then the tunnel runs on the upgraded connection), or refuses it (`400`,
/// counted as a failed carried tunnel). `source`: the client's address its
/// slot counts against (behind a trusted proxy, the forwarded one).
fn ws_tunnel(
    hub: Arc<crate::carrier::Hub>,
    client: SocketAddr,
    source: IpAddr,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    use crate::carrier::ws;
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let accept = match ws::check_request(req.method(), target, req.headers()) {
        Ok(a) => a,
        Err(why) => {
            hub.counters
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(%client, why, "WebSocket tunnel refused");
            if why == ws::VERSION_REFUSED {
                let mut r = text(
                    StatusCode::UPGRADE_REQUIRED,
                    "426 upgrade required: WebSocket version 13",
                );
                r.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                return r;
            }
            return text(StatusCode::BAD_REQUEST, &format!("400 bad request: {why}"));
        }
    };
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "500 internal error");
    };
    let Some(slot) = hub.try_slot(source) else {
        debug!(%client, %source, "WebSocket tunnel refused: this address's unproven carried tunnels are at their limit");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: too many carried tunnels",
        );
    };
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(io) => hub.serve_ws(TokioIo::new(io), client, slot).await,
            Err(e) => debug!(%client, error = %e, "WebSocket tunnel: upgrade failed"),
        }
    });
    let mut r = Response::new(empty_body());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(ws::PROTOCOL),
    );
    r
}

/// Routes, rewrites and forwards one request; notes the route and backend in
/// `rec`.
async fn proxy_request(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
    rec: &mut Option<Record>,
) -> Result<Response<ProxyBody>, Infallible> {
    if let Some(token) = req
        .uri()
        .path()
        .strip_prefix(crate::proxy::acme::HTTP01_PREFIX)
    {
        if let Some(ka) = shared.acme.http01(token) {
            let mut r = Response::new(Full::new(Bytes::from(ka)).map_err(|n| match n {}).boxed());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return Ok(r);
        }
    }
    if let Some((status, msg)) = malformed(&req) {
        return Ok(err(&shared.listener, ErrorKind::BadRequest, status, msg));
    }
    // The client the hub's rules count (`allow`/`deny`, rate limits,
    // stickiness, carried tunnels per address): behind a trusted proxy
    // (nginx, a CDN), every client comes from its address, and each counts
    // as the client it forwards.
    let source = if conn.trusted {
        let fwd = forwarded_client(req.headers(), |ip| shared.trusts_forwarding(ip));
        if let Some(ip) = fwd.filter(|ip| *ip != conn.client.ip().to_canonical()) {
            Record::note(rec, |e| e.forwarded_for = Some(ip));
        }
        fwd.unwrap_or(conn.client.ip())
    } else {
        conn.client.ip()
    };
    // A node's tunnel carried over WebSocket, on any host (like ACME
    // challenges): the hub's own, not a route's.
    if req.uri().path() == crate::carrier::ws::PATH && req.headers().contains_key(header::UPGRADE) {
        if let Some(hub) = shared.carrier.clone() {
            return Ok(ws_tunnel(hub, conn.client, source, req));
        }
    }
    let Some((authority, host)) = request_host(&req) else {
        return Ok(err(
            &shared.listener,
            ErrorKind::UnknownHost,
            StatusCode::NOT_FOUND,
            "404 not found: no route for this host",
        ));
    };
    let Some(route) = shared.table.lookup(&host).cloned() else {
        return Ok(err(
            &shared.listener,
            ErrorKind::UnknownHost,
            StatusCode::NOT_FOUND,
            "404 not found: no route for this host",
        ));
    };
    let c = route.counters.clone();
    c.request();
    Record::note(rec, |e| e.route = Some(route.id.clone()));
    // Before the route's own rules: a request that came on another route's
    // connection (a browser reusing an HTTP/2 connection across names of a
    // wildcard certificate) is sent to a connection of its own, spending
    // none of the client's rate and learning nothing of the route's rules.
    if let Some(sni) = &conn.sni_route {
        if !Arc::ptr_eq(sni, &route) {
            return Ok(err(
                &c,
                ErrorKind::Misdirected,
                StatusCode::MISDIRECTED_REQUEST,
                "421 misdirected request: Host does not match the TLS server name",
            ));
        }
    }
    if !route.settings.access.permits(source) {
        return Ok(err(
            &c,
            ErrorKind::Denied,
            StatusCode::FORBIDDEN,
            "403 forbidden: this address may not use this route",
        ));
    }
    if let Some(ms) = crate::proxy::server::over_limit(&route.limiter, source) {
        let mut r = err(
            &c,
            ErrorKind::RateLimited,
            StatusCode::TOO_MANY_REQUESTS,
            "429 too many requests: this address is over the route's rate limit",
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(ms.div_ceil(1000).max(1)),
        );
        return Ok(r);
    }
    if route.settings.paused {
        return Ok(err(
            &c,
            ErrorKind::Paused,
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the route is paused",
        ));
    }
    // Behind a trusted proxy that took the client's TLS (a CDN, a load
    // balancer talking plain HTTP to the hub), its `X-Forwarded-Proto`
    // says what the client used: a redirect would send it round for good.
    let redirect =
        route.settings.redirect_https && !(conn.trusted && forwarded_https(req.headers()));
    if !conn.tls && (redirect || route.settings.tls == TlsMode::Passthrough) {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut r = text(StatusCode::PERMANENT_REDIRECT, "redirecting to https");
        if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{path}")) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(r);
    }
    if let Some(auth) = &route.auth {
        let given = req.headers().get(header::AUTHORIZATION);
        use crate::proxy::basic_auth::Checked;
        match auth.check(given.map(HeaderValue::as_bytes)).await {
            Checked::User(user) => Record::note(rec, |e| e.user = Some(user)),
            Checked::Busy => {
                let mut r = err(
                    &c,
                    ErrorKind::AuthUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 service unavailable: too many password checks at once; try again",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Ok(r);
            }
            Checked::Denied => {
                let mut r = err(
                    &c,
                    ErrorKind::Unauthorized,
                    StatusCode::UNAUTHORIZED,
                    "401 unauthorized: this route needs a user name and password",
                );
                if let Ok(v) =
                    HeaderValue::from_str(&format!("Basic realm=\"{host}\", charset=\"UTF-8\""))
                {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return Ok(r);
            }
        }
        // The credentials are the hub's, not the backend's.
        req.headers_mut().remove(header::AUTHORIZATION);
    }
    // Dot segments could lead a backend out of the path prefix it was
    // chosen for, or to another path than the authentication service was
    // asked about.
    if (!route.paths.is_empty() || route.forward_auth.is_some())
        && crate::proxy::paths::has_dot_segment(req.uri().path())
    {
        return Ok(err(
            &c,
            ErrorKind::BadPath,
            StatusCode::BAD_REQUEST,
            "400 bad request: `.` or `..` segments in the path",
        ));
    }
    // The authentication service's headers, for the backend, and a
    // refreshed session, for the client.
    let mut auth_headers = Vec::new();
    let mut auth_cookies = Vec::new();
    if let Some(fa) = &route.forward_auth {
        use crate::proxy::forward_auth::{auth_request_headers, Verdict};
        let uri = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let asked = auth_request_headers(
            req.headers(),
            req.method().as_str(),
            uri,
            &authority,
            conn.client.ip(),
            conn.tls,
            conn.trusted,
        );
        let limits = &shared.limits;
        match fa
            .check(asked, limits.connect_timeout, limits.response_timeout)
            .await
        {
            Verdict::Allow { headers, cookies } => {
                // Only the service may set these (`forward` puts them on),
                // and the client may not have them removed on the way as
                // hop-by-hop either.
                unlist_hop_by_hop(req.headers_mut(), fa.copied());
                auth_headers = headers;
                auth_cookies = cookies;
            }
            Verdict::Deny(answer) => {
                c.error(ErrorKind::Unauthorized);
                let mut r = answer.map(|b| Full::new(b).map_err(|n| match n {}).boxed());
                r.extensions_mut().insert(ErrorKind::Unauthorized);
                return Ok(r);
            }
            Verdict::Failed(e) => {
                debug!(route = %route.id, error = %e, "forward_auth service failed");
                return Ok(err(
                    &c,
                    ErrorKind::AuthUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 service unavailable: the authentication service did not answer",
                ));
            }
        }
    }
    let Ok(mut resp) = forward(
        shared,
        conn,
        req,
        rec,
        route,
        c,
        authority,
        auth_headers,
        source,
    )
    .await;
    for v in auth_cookies {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// Sends the admitted request `req` of `route` to one of its backends, with
/// the headers its `forward_auth` service gave (`auth`), and returns the
/// backend's response (or the error answer). `source`: the client that
/// `sticky` balancing keeps on one backend.
#[allow(clippy::too_many_arguments)] // the admitted request and what admitting it learnt
async fn forward(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
    rec: &mut Option<Record>,
    route: Arc<Route>,
    c: Arc<Counters>,
    authority: String,
    auth: Vec<(HeaderName, HeaderValue)>,
    source: IpAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    // The backends of the longest matching path prefix, or the route's own.
    let (up, under) = route.backends_for(req.uri().path());
    // A body announced over the route's limit is refused before a backend
    // is contacted (and before a client waiting on `Expect: 100-continue`
    // sends it); one that turns out larger is cut off at the limit.
    let limit = route
        .settings
        .max_body_size
        .map(|max| BodyLimit { left: max });
    let fault = ClientBody::new();
    if let Some(max) = route.settings.max_body_size {
        if announced_length(req.headers()).is_some_and(|n| n > max) {
            c.error(ErrorKind::BodyTooLarge);
            return Ok(too_large());
        }
    }
    // A WebSocket over HTTP/2 goes to the backend as an HTTP/1.1 upgrade
    // with a key of the hub's, and its `101` comes back as a `200`.
    let ws_key = websocket_over_h2(&req).then(websocket_key);
    let upgrade = match ws_key {
        Some(_) => Some(HeaderValue::from_static("websocket")),
        None => upgrade_of(&req),
    };
    let h2 = up.protocol() == BackendProtocol::Http2;
    if h2 && upgrade.is_some() {
        return Ok(err(
            &c,
            ErrorKind::BackendProtocol,
            StatusCode::NOT_IMPLEMENTED,
            "501 not implemented: this route's backends speak HTTP/2; upgrades (WebSocket) need backend_protocol = \"http1\"",
        ));
    }
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let is_head = req.method() == http::Method::HEAD;
    let (mut parts, body) = req.into_parts();
    let trailers = h2 && accepts_trailers(&parts.headers);
    let client_trailers = TrailerRules::new(
        &parts.headers,
        route.forward_auth.as_ref().map_or(&[], |fa| fa.copied()),
        &route.settings.request_headers,
        route.auth.is_some(),
    );
    if let Some(key) = &ws_key {
        websocket_request_head(&mut parts, key);
    }
    let ws_stream = ws_key
        .as_ref()
        .and_then(|_| parts.extensions.remove::<Arc<Streams>>())
        .map(|s| s.open());
    strip_hop_by_hop(&mut parts.headers, upgrade.clone());
    one_length(&mut parts.headers);
    add_forwarding(
        &mut parts.headers,
        conn.client.ip(),
        conn.tls,
        &authority,
        conn.trusted,
    );
    if let Some(fa) = &route.forward_auth {
        set_auth_headers(&mut parts.headers, fa.copied(), auth);
    }
    edit_headers(&mut parts.headers, &route.settings.request_headers);
    let mut path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if let Some(p) = under.filter(|p| p.strip_prefix) {
        match http::uri::PathAndQuery::try_from(p.prefix.strip(path.path(), path.query())) {
            Ok(stripped) => path = stripped,
            Err(_) => {
                return Ok(err(
                    &c,
                    ErrorKind::BadPath,
                    StatusCode::BAD_REQUEST,
                    "400 bad request: the path cannot be forwarded",
                ))
            }
        }
    }
    if h2 {
        // HTTP/2 carries the host in `:authority` and the scheme the client
        // asked for in `:scheme` (as `X-Forwarded-Proto` does); `te:
        // trailers` is the one TE value HTTP/2 allows, and gRPC servers look
        // for it.
        let scheme = if conn.tls { "https" } else { "http" };
        match http::Uri::builder()
            .scheme(scheme)
            .authority(authority.as_str())
            .path_and_query(path)
            .build()
        {
            Ok(u) => parts.uri = u,
            Err(_) => {
                return Ok(err(
                    &c,
                    ErrorKind::UnknownHost,
                    StatusCode::BAD_REQUEST,
                    "400 bad request: the host cannot be forwarded",
                ))
            }
        }
        parts.headers.remove(header::HOST);
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        parts.version = Version::HTTP_2;
    } else {
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, v);
        }
        join_cookies(&mut parts.headers);
        // hyper sends a GET, HEAD or CONNECT whose body length it does not
        // know (chunked from the client, or from an HTTP/2 client without
        // `content-length`) with no body at all; saying `chunked` sends it.
        if !body.is_end_stream() && body.size_hint().exact().is_none() {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        parts.uri = http::Uri::from(path);
        parts.version = Version::HTTP_11;
    }
    let breq = Request::from_parts(
        parts,
        limited(
            body,
            c.clone(),
            route.bandwidth.clone(),
            limit,
            fault.clone(),
            client_trailers,
            shared.limits.idle_timeout,
        ),
    );

    let Ok(slot) = up.admit() else {
        return Ok(err(
            &c,
            ErrorKind::OverCapacity,
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the route is at its connection limit",
        ));
    };
    let plan = up.plan(Some(source));
    if h2 {
        let (resp, backend, lease) = match send_h2(&shared, &route, up, plan, breq, &fault).await {
            Ok(x) => x,
            Err(_) if fault.failed() => return Ok(fault.answer().unwrap_or_else(too_large)),
            Err((kind, status, msg)) => return Ok(err(&c, kind, status, msg)),
        };
        up.note_ok(backend.addr);
        Record::note(rec, |e| e.backend = Some(backend.addr));
        let (mut parts, body) = resp.into_parts();
        response_head(&mut parts, None, &route.settings.response_headers);
        return Ok(Response::from_parts(
            parts,
            counted(
                body,
                c,
                Some((lease, slot)),
                route.bandwidth.clone(),
                shared.limits.idle_timeout,
                fault,
                conn.sending(),
            ),
        ));
    }
    let mut pooled = None;
    if upgrade.is_none() {
        pooled = conn.reuse(up, &plan).or_else(|| up.take_idle(&plan));
    }
    let mut breq = breq;
    let (resp, sender, backend, lease) = loop {
        let from_pool = pooled.is_some();
        let (mut sender, backend, lease) = match pooled.take() {
            Some(x) => x,
            None => {
                let connected = connect_backend(&shared, &route, up, &plan, false).await;
                let (io, backend, lease) = match connected {
                    Ok(x) => x,
                    Err((kind, status, msg)) => return Ok(err(&c, kind, status, msg)),
                };
                let hs = match io {
                    BackendIo::Tls(tls) => handshake(*tls).await,
                    BackendIo::Plain(tcp) => handshake(tcp).await,
                };
                match hs {
                    Ok(s) => (s, backend, lease),
                    Err((kind, status, msg)) => return Ok(err(&c, kind, status, msg)),
                }
            }
        };
        match send(fault.send_on(&mut sender, breq), &shared, &fault).await {
            Ok(r) => break (r, sender, backend, lease),
            // The client's body failed (part of it is gone: no retry).
            Err(_) if fault.failed() => return Ok(fault.answer().unwrap_or_else(too_large)),
            Err((_, Some(back))) if from_pool => {
                // The idle connection was gone: once more on a fresh one.
                breq = back;
                continue;
            }
            Err((e, _)) => {
                note_timeout(up, backend.addr, &e, &fault);
                let (kind, status, msg) = e;
                return Ok(err(&c, kind, status, msg));
            }
        }
    };
    let mut resp = resp;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && !switch_answers(upgrade.as_ref(), resp.headers().get(header::UPGRADE))
    {
        // (The backend connection goes: it has switched to something.)
        return Ok(err(
            &c,
            ErrorKind::BackendProtocol,
            StatusCode::BAD_GATEWAY,
            "502 bad gateway: the backend switched to a protocol the client did not ask for",
        ));
    }
    if let Some(key) = &ws_key {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && !websocket_accepted(resp.headers(), key)
        {
            return Ok(err(
                &c,
                ErrorKind::BackendProtocol,
                StatusCode::BAD_GATEWAY,
                "502 bad gateway: the backend's WebSocket handshake does not answer the hub's key",
            ));
        }
    }
    if other_coding(is_head, resp.status(), resp.headers()) {
        // (The backend connection goes with the response, dropped unread.)
        return Ok(err(
            &c,
            ErrorKind::BackendProtocol,
            StatusCode::BAD_GATEWAY,
            "502 bad gateway: the backend used a transfer coding other than chunked",
        ));
    }
    up.note_ok(backend.addr);
    Record::note(rec, |e| e.backend = Some(backend.addr));
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS && upgrade.is_none() {
        // Reused once the response body has been read to its end: by this
        // client's next request, or from the pool.
        conn.keep(up.hold(backend.addr, sender));
    }
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let mut hold = Some((lease, slot));
    if switching {
        if let Some(cu) = client_upgrade {
            let bu = hyper::upgrade::on(&mut resp);
            let idle = shared.limits.idle_timeout;
            let c2 = c.clone();
            let bw = Some(route.bandwidth.clone());
            // The splice keeps the connection's place, busy: it is not
            // closed to make room; an HTTP/2 stream's keeps the stream open,
            // so that its connection is not closed as idle.
            let h = (hold.take(), conn.slot.clone(), conn.slot.busy(), ws_stream);
            // Cut with the client connection's other holders when the
            // proxy's drain is over.
            let cut = conn.slot.cut();
            // An HTTP/2 stream's writes wait on the stream's flow control,
            // not on the socket (which the connection's watch judges).
            let queue = if ws_key.is_some() { None } else { conn.queue };
            // (An HTTP/1.1 connection's: no stream's.)
            let stall = ws_key.is_none().then(|| Arc::clone(&conn.stall));
            let relay = async move {
                match tokio::try_join!(cu, bu) {
                    Ok((cio, bio)) => {
                        let (cio, bio) = (TokioIo::new(cio), TokioIo::new(bio));
                        let r = splice(cio, bio, c2.clone(), idle, bw, queue).await;
                        // Its watch, still under it, cut a client that took
                        // nothing: the route counts it.
                        if stall.is_some_and(|s| s.take_cut()) {
                            c2.error(ErrorKind::ClientNotReading);
                        }
                        debug!(result = ?r, "upgraded connection ended");
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            };
            tokio::spawn(async move {
                let _h = h;
                tokio::select! {
                    () = relay => {}
                    () = cut => debug!("upgraded connection cut: the proxy's drain is over"),
                }
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    let keep = if switching && ws_key.is_none() {
        parts.headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    response_head(&mut parts, keep, &route.settings.response_headers);
    if switching && ws_key.is_some() {
        // RFC 8441 §5: the HTTP/2 client's WebSocket opens with a `200`;
        // the subprotocol and extensions the backend chose stay.
        parts.status = StatusCode::OK;
        parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let bw = route.bandwidth.clone();
    Ok(Response::from_parts(
        parts,
        counted(
            body,
            c,
            hold,
            bw,
            shared.limits.idle_timeout,
            fault,
            conn.sending(),
        ),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_h2c_upgrade_is_never_passed_on() {
        let req = |upgrade: &str, connection: &str| {
            Request::builder()
                .header(header::UPGRADE, upgrade)
                .header(header::CONNECTION, connection)
                .body(())
                .unwrap()
        };
        assert_eq!(
            upgrade_of(&req("websocket", "keep-alive, Upgrade")).unwrap(),
            "websocket"
        );
        assert_eq!(upgrade_of(&req("h2c", "Upgrade, HTTP2-Settings")), None);
        assert_eq!(upgrade_of(&req("H2C", "upgrade")), None);
        assert_eq!(
            upgrade_of(&req("h2c, websocket/13", "upgrade")).unwrap(),
            "websocket/13"
        );
        assert_eq!(upgrade_of(&req("websocket", "keep-alive")), None);
        // Not an upgrade: the Upgrade header goes with the hop-by-hop ones.
        let mut h = req("h2c", "Upgrade, HTTP2-Settings").headers().clone();
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        strip_hop_by_hop(&mut h, None);
        assert!(h.is_empty(), "{h:?}");
    }

    /// A request body (with `fault`) or a response body (to a request
    /// whose body is `request`) over `inner`.
    fn counted_body<B>(
        inner: B,
        counters: &Arc<Counters>,
        fault: Option<ClientBody>,
        request: Option<ClientBody>,
        idle: Duration,
    ) -> CountedBody<B> {
        CountedBody {
            inner,
            counters: counters.clone(),
            inbound: fault.is_some(),
            throttle: Throttle::keep_or_new(None, None),
            pause: None,
            held: None,
            _hold: None,
            limit: None,
            fault,
            trailers: None,
            request,
            idle,
            waiting: false,
            timer: None,
            sending: None,
        }
    }

    /// A body that gives one frame, then `Pending` for good, or with `fail`
    /// an error.
    struct OneFrame {
        given: bool,
        fail: bool,
    }

    impl Body for OneFrame {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if !self.given {
                self.given = true;
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))));
            }
            if self.fail {
                return Poll::Ready(Some(Err("connection reset".into())));
            }
            Poll::Pending
        }
    }

    #[test]
    fn a_request_body_dropped_unread_has_ended() {
        let fault = ClientBody::new();
        let body = counted_body(
            http_body_util::Empty::<Bytes>::new(),
            &Arc::default(),
            Some(fault.clone()),
            None,
            Duration::ZERO,
        );
        assert!(fault.ended_at().is_none());
        drop(body);
        assert!(fault.ended_at().is_some());
    }

    #[tokio::test]
    async fn a_stall_is_timed_from_the_wait_not_from_the_last_frame() {
        let idle = Duration::from_millis(200);
        let c = Arc::new(Counters::default());
        let one = OneFrame {
            given: false,
            fail: false,
        };
        let mut b = counted_body(one, &c, None, None, idle);
        assert!(b.frame().await.unwrap().is_ok());
        // Its reader asks for nothing for longer than `idle` (the client
        // reads slowly), then asks again: the backend gets `idle` from then.
        tokio::time::sleep(idle * 2).await;
        let t = tokio::time::Instant::now();
        let e = b.frame().await.unwrap().unwrap_err();
        assert!(t.elapsed() >= idle * 3 / 4, "{:?}", t.elapsed());
        assert!(matches!(
            e.downcast_ref(),
            Some(BodyFailed(ErrorKind::BackendTimeout, _))
        ));
        assert_eq!(c.errors_of(ErrorKind::BackendTimeout), 1);
    }

    #[tokio::test]
    async fn a_response_broken_off_by_the_backend_is_counted() {
        let c = Arc::new(Counters::default());
        let failing = || OneFrame {
            given: false,
            fail: true,
        };
        let mut b = counted_body(failing(), &c, None, Some(ClientBody::new()), Duration::ZERO);
        assert!(b.frame().await.unwrap().is_ok());
        let e = b.frame().await.unwrap().unwrap_err();
        assert!(matches!(
            e.downcast_ref(),
            Some(BodyFailed(ErrorKind::BackendAborted, _))
        ));
        assert_eq!(c.errors_of(ErrorKind::BackendAborted), 1);
        // Cut off after the request's body failed: that failure, counted
        // already, is the reason.
        let request = ClientBody::new();
        request.set(ClientBody::TOO_LARGE);
        let mut b = counted_body(failing(), &c, None, Some(request), Duration::ZERO);
        assert!(b.frame().await.unwrap().is_ok());
        let e = b.frame().await.unwrap().unwrap_err();
        assert!(matches!(
            e.downcast_ref(),
            Some(BodyFailed(ErrorKind::BodyTooLarge, _))
        ));
        assert_eq!(c.errors_of(ErrorKind::BackendAborted), 1);
        assert_eq!(c.errors_of(ErrorKind::BodyTooLarge), 0);
    }

    #[tokio::test]
    async fn a_response_dropped_with_its_client_cut_off_counts_it() {
        let c = Arc::new(Counters::default());
        let conn = Stall::conn();
        let body = |sending: &Arc<Stall>| {
            let one = OneFrame {
                given: false,
                fail: false,
            };
            let mut b = counted_body(one, &c, None, Some(ClientBody::new()), Duration::ZERO);
            b.sending = Some(Arc::clone(sending));
            b
        };
        // Dropped with the client still there (gone, or done): nothing.
        let mut b = body(&conn);
        assert!(b.frame().await.unwrap().is_ok());
        drop(b);
        assert_eq!(c.errors_of(ErrorKind::ClientNotReading), 0);
        // Dropped with the client cut off: counted, and the cut with it.
        let b = body(&conn);
        conn.cut_off();
        assert!(conn.uncounted_cut());
        drop(b);
        assert_eq!(c.errors_of(ErrorKind::ClientNotReading), 1);
        assert!(!conn.uncounted_cut());
    }

    /// An HTTP/1.1 backend connection on an in-memory pipe, to a backend
    /// that reads each request's body and answers with its path; to
    /// `/wait`, once it has said so on `got` and `go` is notified.
    async fn backend_on_a_pipe(
        got: Arc<tokio::sync::Notify>,
        go: Arc<tokio::sync::Notify>,
    ) -> Pooled {
        let (near, far) = tokio::io::duplex(1 << 16);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (got, go) = (Arc::clone(&got), Arc::clone(&go));
            async move {
                let path = req.uri().path().to_string();
                let _ = req.into_body().collect().await;
                if path == "/wait" {
                    got.notify_one();
                    go.notified().await;
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(path))))
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(far), svc),
        );
        handshake(near).await.unwrap()
    }

    /// A request to `path` with `body`, the body of `fault`.
    fn request_to(path: &str, body: &'static [u8], fault: &ClientBody) -> Request<ProxyBody> {
        let b = Full::new(Bytes::from_static(body));
        let b = counted_body(
            b,
            &Arc::default(),
            Some(fault.clone()),
            None,
            Duration::ZERO,
        );
        Request::builder()
            .uri(path)
            .header(header::HOST, "a.example")
            .body(b.boxed())
            .unwrap()
    }

    #[tokio::test]
    async fn a_cut_spares_the_exchange_after_the_one_it_was_meant_for() {
        let (got, go) = (Arc::default(), Arc::new(tokio::sync::Notify::new()));
        let mut sender = backend_on_a_pipe(Arc::clone(&got), Arc::clone(&go)).await;
        let c = Arc::new(Counters::default());
        // hyper reads the first response to its end and lets the connection
        // go idle, while the response still waits for its client.
        let first = ClientBody::new();
        let req = request_to("/first", b"abc", &first);
        let resp = first.send_on(&mut sender, req).await.unwrap();
        let mut body = counted_body(resp.into_body(), &c, None, Some(first), Duration::ZERO);
        let client = Stall::conn();
        body.sending = Some(Arc::clone(&client));
        let idle = tokio::time::timeout(Duration::from_secs(5), sender.ready()).await;
        assert!(matches!(idle, Ok(Ok(()))));
        // The next exchange on the connection is at the backend when the
        // first client is cut off for taking nothing.
        let next = ClientBody::new();
        let req = request_to("/wait", b"de", &next);
        let answer = tokio::spawn(next.send_on(&mut sender, req));
        got.notified().await;
        client.cut_off();
        drop(body);
        assert_eq!(c.errors_of(ErrorKind::ClientNotReading), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        go.notify_one();
        let resp = answer.await.unwrap().unwrap();
        let got_body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got_body, "/wait");
        // A cut for the exchange the connection carries drops it.
        let last = ClientBody::new();
        let req = request_to("/wait", b"", &last);
        let answer = tokio::spawn(last.send_on(&mut sender, req));
        got.notified().await;
        last.cut();
        assert!(answer.await.unwrap().is_err());
        assert!(sender.is_closed());
    }

    #[tokio::test]
    async fn http2_responses_go_out_in_frames_of_at_most_16_kib() {
        let data = Bytes::from(vec![5u8; 2 * H2_FRAME + 100]);
        let inner = Full::new(data.clone()).map_err(|n| match n {}).boxed();
        let streams = Streams::new();
        let mut b = TrackedBody::new(inner, streams.open());
        let stall = Stall::conn();
        b.stall = Some(Arc::clone(&stall));
        assert_eq!(b.size_hint().exact(), Some(data.len() as u64));
        let mut got = Vec::new();
        while let Some(f) = b.frame().await {
            let d = f.unwrap().into_data().unwrap();
            assert!(d.len() <= H2_FRAME);
            got.push(d.len());
            if got.len() == 1 {
                assert_eq!(b.size_hint().exact(), Some(H2_FRAME as u64 + 100));
                assert!(!b.is_end_stream());
                assert_eq!(stall.body_state(), (1, true));
            }
        }
        assert_eq!(got, vec![H2_FRAME, H2_FRAME, 100]);
        assert!(b.is_end_stream());
        assert_eq!(stall.body_state(), (3, false));
        assert!(streams.idle_for().is_none());
        drop(b);
        assert!(streams.idle_for().is_some());
    }

    #[tokio::test]
    async fn a_request_body_notes_its_moves_and_waits_for_the_client() {
        let fault = ClientBody::new();
        let begun = tokio::time::Instant::now();
        let (quiet, idle) = (Duration::from_secs(30), Duration::from_secs(30));
        // Not taken from yet: `quiet` after the request went out.
        assert_eq!(fault.stuck_at(begun, quiet, idle), begun + quiet);
        let one = OneFrame {
            given: false,
            fail: false,
        };
        let mut b = counted_body(one, &Arc::default(), Some(fault.clone()), None, idle);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(b.frame().await.unwrap().is_ok());
        let moved = fault.stuck_at(begun, quiet, idle);
        assert!(
            moved >= begun + quiet + Duration::from_millis(10),
            "{moved:?}"
        );
        // Waiting for the client: its own stall has its turn first.
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut b).poll_frame(cx))).await;
        assert!(polled.is_pending());
        let waiting = fault.stuck_at(begun, quiet, idle);
        assert!(waiting >= moved + STALL_GRACE, "{waiting:?} {moved:?}");
    }

    #[test]
    fn connect_and_ambiguous_hosts_are_refused() {
        let req = |m: &str, v: Version, uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().method(m).version(v).uri(uri);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        let status = |r: &Request<()>| malformed(r).map(|(s, _)| s.as_u16());
        let v11 = Version::HTTP_11;
        let v2 = Version::HTTP_2;
        assert_eq!(status(&req("GET", v11, "/", &["a.example"])), None);
        // HTTP/1.1 needs a Host (RFC 9112 §3.2), HTTP/1.0 does not.
        assert_eq!(status(&req("GET", v11, "/", &[])), Some(400));
        assert_eq!(
            status(&req("GET", v11, "http://a.example/", &[])),
            Some(400)
        );
        assert_eq!(status(&req("GET", Version::HTTP_10, "/", &[])), None);
        assert_eq!(
            status(&req("CONNECT", v11, "a.example:443", &["a.example:443"])),
            Some(405)
        );
        assert_eq!(
            status(&req("GET", v11, "/", &["a.example", "b.example"])),
            Some(400)
        );
        assert_eq!(
            status(&req("GET", v11, "/", &["a.example", "a.example"])),
            Some(400)
        );
        // Absolute form over HTTP/1.1 goes by its target (RFC 9112 §3.2.2).
        assert_eq!(
            status(&req("GET", v11, "http://a.example/", &["b.example"])),
            None
        );
        // HTTP/2: host must match the authority, in any case.
        assert_eq!(
            status(&req("GET", v2, "https://a.example/", &["A.Example"])),
            None
        );
        assert_eq!(
            status(&req("GET", v2, "https://a.example/", &["b.example"])),
            Some(400)
        );
        assert_eq!(status(&req("GET", v2, "https://a.example/", &[])), None);
        // A default port left out of one of them is the same authority.
        assert_eq!(
            status(&req("GET", v2, "https://a.example:443/", &["a.example"])),
            None
        );
        assert_eq!(
            status(&req(
                "GET",
                v2,
                "https://a.example:443/",
                &["a.example:8443"]
            )),
            Some(400)
        );
        assert!(same_authority("[2001:db8::1]:443", "[2001:DB8::1]"));
        assert!(!same_authority("[2001:db8::1]", "[2001:db8::2]"));
        assert!(!same_authority("", ""));
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_refused() {
        let req = |codings: &[&str]| {
            let mut b = Request::builder()
                .uri("/")
                .header(header::HOST, "a.example");
            for c in codings {
                b = b.header(header::TRANSFER_ENCODING, *c);
            }
            b.body(()).unwrap()
        };
        let status = |r: &Request<()>| malformed(r).map(|(s, _)| s.as_u16());
        assert_eq!(status(&req(&[])), None);
        assert_eq!(status(&req(&["chunked"])), None);
        assert_eq!(status(&req(&["Chunked "])), None);
        // hyper takes off the chunked framing and leaves gzip on the body.
        assert_eq!(status(&req(&["gzip, chunked"])), Some(501));
        assert_eq!(status(&req(&["gzip", "chunked"])), Some(501));
        assert_eq!(status(&req(&["chunked, chunked"])), Some(501));
        assert_eq!(status(&req(&[""])), Some(501));
        // A backend's response: only where the coding frames a body.
        let h = |c: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::TRANSFER_ENCODING, HeaderValue::from_static(c));
            m
        };
        let ok = StatusCode::OK;
        assert!(!other_coding(false, ok, &HeaderMap::new()));
        assert!(!other_coding(false, ok, &h("chunked")));
        assert!(other_coding(false, ok, &h("gzip, chunked")));
        assert!(other_coding(false, ok, &h("gzip")));
        assert!(!other_coding(true, ok, &h("gzip, chunked")));
        assert!(!other_coding(false, StatusCode::NOT_MODIFIED, &h("gzip")));
        assert!(!other_coding(false, StatusCode::NO_CONTENT, &h("gzip")));
    }

    #[test]
    fn a_backends_response_head_goes_on_as_http_1_1_with_one_length() {
        let head = |version: Version, lengths: &[&'static str]| {
            let mut b = Response::builder().version(version);
            for l in lengths {
                b = b.header(header::CONTENT_LENGTH, *l);
            }
            let mut parts = b.body(()).unwrap().into_parts().0;
            response_head(&mut parts, None, &Vec::new());
            let all: Vec<String> = parts
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            (parts.version, all)
        };
        let v11 = Version::HTTP_11;
        // An HTTP/1.0 backend's answer keeps the client's connection alive.
        assert_eq!(head(Version::HTTP_10, &["12"]), (v11, vec!["12".into()]));
        assert_eq!(head(Version::HTTP_2, &[]), (v11, vec![]));
        // A list of one value, as hyper reads it, goes on as that value.
        assert_eq!(head(v11, &["12, 12"]), (v11, vec!["12".into()]));
        assert_eq!(head(v11, &["12", "12"]), (v11, vec!["12".into()]));
        // No length at all (an answer to a HEAD, unread by hyper): none.
        assert_eq!(head(v11, &["12, 13"]), (v11, vec![]));
        assert_eq!(head(v11, &["+12"]), (v11, vec![]));
        assert_eq!(head(v11, &["x"]), (v11, vec![]));
        // A request's too.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        one_length(&mut h);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
    }

    #[tokio::test]
    async fn a_clients_trailers_lose_what_its_headers_would() {
        let mut head = HeaderMap::new();
        head.insert(header::CONNECTION, HeaderValue::from_static("x-secret"));
        let auth = [HeaderName::from_static("x-forwarded-user")];
        let edits = vec![(
            HeaderName::from_static("x-env"),
            Some(HeaderValue::from_static("prod")),
        )];
        let rules = TrailerRules::new(&head, &auth, &edits, true);
        let mut t = HeaderMap::new();
        for n in [
            "x-forwarded-for",
            "x_forwarded_user",
            "x-real-ip",
            "forwarded",
            "x-secret",
            "x-env",
            "authorization",
            "host",
            "content-length",
            "connection",
            "te",
            "x-sum",
        ] {
            t.insert(HeaderName::from_static(n), HeaderValue::from_static("1"));
        }
        let inner = http_body_util::Empty::<Bytes>::new()
            .with_trailers(async move { Some(Ok::<_, Infallible>(t)) });
        let fault = Some(ClientBody::new());
        let mut b = counted_body(
            Box::pin(inner),
            &Arc::default(),
            fault,
            None,
            Duration::ZERO,
        );
        b.trailers = Some(rules);
        let t = b.frame().await.unwrap().unwrap().into_trailers().unwrap();
        let left: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-sum"]);
        // Without basic_auth_file, the credentials are the backend's.
        let rules = TrailerRules::new(&HeaderMap::new(), &[], &Vec::new(), false);
        let mut t = HeaderMap::new();
        t.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        rules.clean(&mut t);
        assert!(t.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn forwarded_https_reads_the_clients_side() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("x-forwarded-proto", v.parse().unwrap());
            m
        };
        assert!(forwarded_https(&h("https")));
        assert!(forwarded_https(&h("HTTPS , http")));
        assert!(!forwarded_https(&h("http, https")));
        assert!(!forwarded_https(&h("")));
        assert!(!forwarded_https(&HeaderMap::new()));
    }

    #[test]
    fn a_switch_must_answer_the_clients_upgrade() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        let ws = v("websocket");
        assert!(switch_answers(Some(&ws), Some(&v("WebSocket"))));
        assert!(switch_answers(
            Some(&v("foo/1, websocket")),
            Some(&v(" websocket "))
        ));
        // No upgrade asked (a plain request, an HTTP/2 client): never.
        assert!(!switch_answers(None, Some(&ws)));
        // Another protocol, or none named.
        assert!(!switch_answers(Some(&ws), Some(&v("h2c"))));
        assert!(!switch_answers(Some(&ws), Some(&v(""))));
        assert!(!switch_answers(Some(&ws), None));
    }

    #[test]
    fn cookies_of_http2_clients_are_joined_for_http1() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        assert!(all[0].is_sensitive());
    }

    #[test]
    fn a_client_cannot_list_the_auth_services_headers_as_hop_by_hop() {
        let names = [HeaderName::from_static("x-auth-request-user")];
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Auth-Request-User"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-other"));
        unlist_hop_by_hop(&mut h, &names);
        let all: Vec<_> = h.get_all(header::CONNECTION).iter().collect();
        assert_eq!(all, ["keep-alive, x-other"]);
        h.insert("x-auth-request-user", HeaderValue::from_static("alice"));
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h["x-auth-request-user"], "alice");
        assert!(!h.contains_key("x-other"));
        // Only the listed name: the header goes away altogether.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-auth-request-user"),
        );
        unlist_hop_by_hop(&mut h, &names);
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn framing_and_proxy_headers_stop_here() {
        let v = HeaderValue::from_static;
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, v("chunked"));
        h.insert(header::CONTENT_LENGTH, v("3"));
        h.insert("proxy", v("http://192.0.2.66:8080"));
        h.insert(header::PROXY_AUTHORIZATION, v("Basic eDp5"));
        h.insert(header::PROXY_AUTHENTICATE, v("Basic realm=\"inner\""));
        h.insert(header::CONTENT_TYPE, v("text/plain"));
        strip_hop_by_hop(&mut h, None);
        let left: Vec<_> = h.keys().collect();
        assert_eq!(left, [header::CONTENT_TYPE]);
        // Without Transfer-Encoding the length frames the message.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, v("3"));
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h[header::CONTENT_LENGTH], "3");
    }

    #[test]
    fn forwarding_headers_spelled_with_underscores_are_replaced_too() {
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let mut h = HeaderMap::new();
        for n in [
            "x_forwarded_for",
            "x_forwarded-host",
            "x-forwarded_proto",
            "x_real_ip",
            "x_real-ip",
        ] {
            h.insert(
                HeaderName::from_static(n),
                HeaderValue::from_static("192.0.2.66"),
            );
        }
        for n in ["x_forwardedness", "x_real_ips"] {
            h.insert(
                HeaderName::from_static(n),
                HeaderValue::from_static("stays"),
            );
        }
        // The authentication service hears none of them either.
        let asked = crate::proxy::forward_auth::auth_request_headers(
            &h, "GET", "/", "a.b", ip, false, false,
        );
        add_forwarding(&mut h, ip, false, "a.b", false);
        for h in [&h, &asked] {
            assert_eq!(h["x-forwarded-for"], "198.51.100.7");
            assert!(!h.iter().any(|(_, v)| v == "192.0.2.66"), "{h:?}");
            assert_eq!(h.iter().filter(|(_, v)| *v == "stays").count(), 2, "{h:?}");
        }
    }

    #[test]
    fn only_the_auth_services_values_of_its_headers_go_on() {
        let names = [
            HeaderName::from_static("x-forwarded-user"),
            HeaderName::from_static("x-auth-request-user"),
        ];
        let mut h = HeaderMap::new();
        for n in [
            "x-forwarded-user",
            "x_forwarded_user",
            "x-auth-request-user",
            "x_auth_request-user",
        ] {
            h.insert(
                HeaderName::from_static(n),
                HeaderValue::from_static("mallory"),
            );
        }
        // A trusted proxy's forwarding headers are kept, but not these.
        add_forwarding(&mut h, "198.51.100.7".parse().unwrap(), false, "a.b", true);
        let alice = HeaderValue::from_static("alice");
        let values = names.iter().map(|n| (n.clone(), alice.clone())).collect();
        set_auth_headers(&mut h, &names, values);
        assert!(!h.iter().any(|(_, v)| v == "mallory"), "{h:?}");
        for n in &names {
            let all: Vec<_> = h.get_all(n).iter().collect();
            assert_eq!(all, ["alice"]);
        }
        assert_eq!(h["x-forwarded-for"], "198.51.100.7");
    }

    #[test]
    fn announced_length_reads_lists_as_hyper_does() {
        let h = |vals: &[&str]| {
            let mut m = HeaderMap::new();
            for v in vals {
                m.append(header::CONTENT_LENGTH, HeaderValue::from_str(v).unwrap());
            }
            m
        };
        assert_eq!(announced_length(&h(&[])), None);
        assert_eq!(announced_length(&h(&["42"])), Some(42));
        assert_eq!(announced_length(&h(&["5000000, 5000000"])), Some(5_000_000));
        assert_eq!(announced_length(&h(&["7", "7"])), Some(7));
        assert_eq!(announced_length(&h(&["7", "8"])), None);
        assert_eq!(announced_length(&h(&["7,8"])), None);
        assert_eq!(announced_length(&h(&["x"])), None);
        assert_eq!(announced_length(&h(&["+7"])), None);
    }

    #[test]
    fn hosts() {
        let r = Request::builder()
            .uri("/x")
            .header("host", "Blog.GW.example.org:8080")
            .body(())
            .unwrap();
        let (a, h) = request_host(&r).unwrap();
        assert_eq!(a, "Blog.GW.example.org:8080");
        assert_eq!(h.as_str(), "blog.gw.example.org");
        let r = Request::builder()
            .uri("https://www.example.com/x")
            .header("host", "other.example")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).unwrap().1.as_str(), "www.example.com");
        let r = Request::builder()
            .uri("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert!(request_host(&r).is_none());
    }

    #[test]
    fn the_forwarded_client_is_the_rightmost_untrusted_address() {
        let proxies: [IpAddr; 2] = ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let trusts = |ip: IpAddr| proxies.contains(&ip);
        let of = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", HeaderValue::from_static(v));
            }
            forwarded_client(&h, trusts).map(|ip| ip.to_string())
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(of(&["198.51.100.7"]), some("198.51.100.7"));
        // What the client sent itself is left of what the proxy appended.
        assert_eq!(of(&["192.0.2.9, 198.51.100.7"]), some("198.51.100.7"));
        // Trusted proxies in a chain are passed over, across header lines.
        assert_eq!(
            of(&["192.0.2.9, 198.51.100.7", "10.0.0.2 ,10.0.0.1"]),
            some("198.51.100.7")
        );
        assert_eq!(of(&["10.0.0.2, 10.0.0.1"]), some("10.0.0.2"));
        assert_eq!(of(&["[2001:db8::7]:1234"]), some("2001:db8::7"));
        assert_eq!(of(&["::ffff:198.51.100.7"]), some("198.51.100.7"));
        assert_eq!(of(&["198.51.100.7:443"]), some("198.51.100.7"));
        // No header, or one the proxies did not fill with addresses: none.
        assert_eq!(of(&[]), None);
        assert_eq!(of(&["unknown"]), None);
        assert_eq!(of(&["198.51.100.7, unknown, 10.0.0.1"]), None);
        assert_eq!(of(&[""]), None);
        // Bytes that are not text left of the client's address (what
        // nginx passes on as the client wrote it) do not hide it.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xc3\xa9, 198.51.100.7").unwrap(),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        assert_eq!(
            forwarded_client(&h, trusts),
            Some("198.51.100.7".parse().unwrap())
        );
        // ... and the hub appends its entry to them, dropping nothing.
        add_forwarding(&mut h, "10.0.0.2".parse().unwrap(), false, "a.b", true);
        assert_eq!(
            h.get("x-forwarded-for").unwrap().as_bytes(),
            b"\xc3\xa9, 198.51.100.7, 10.0.0.1, 10.0.0.2"
        );
        // Not text where the walk reaches it: none.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xc3\xa9, 10.0.0.1").unwrap(),
        );
        assert_eq!(forwarded_client(&h, trusts), None);
    }

    #[test]
    fn hop_by_hop_and_forwarding() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.9"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, None);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none() && h.get("transfer-encoding").is_none());
        // A trusted proxy's headers are appended to (For) or kept (Proto, Host).
        let mut t = h.clone();
        t.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        t.insert(
            "x-forwarded-host",
            HeaderValue::from_static("front.example"),
        );
        add_forwarding(
            &mut t,
            "::ffff:198.51.100.7".parse().unwrap(),
            false,
            "a.b:80",
            true,
        );
        assert_eq!(t["x-forwarded-for"], "192.0.2.9, 198.51.100.7");
        assert_eq!(t["x-forwarded-proto"], "https");
        assert_eq!(t["x-forwarded-host"], "front.example");
        // Anyone else's are replaced, whatever their spelling.
        h.insert("X-Forwarded-Port", HeaderValue::from_static("1"));
        h.insert("x-forwarded-prefix", HeaderValue::from_static("/admin"));
        h.insert("x-real-ip", HeaderValue::from_static("192.0.2.10"));
        h.insert("forwarded", HeaderValue::from_static("for=192.0.2.11"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-forwardedness", HeaderValue::from_static("stays"));
        add_forwarding(
            &mut h,
            "::ffff:198.51.100.7".parse().unwrap(),
            true,
            "a.b:443",
            false,
        );
        assert_eq!(h["x-forwarded-for"], "198.51.100.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.b:443");
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.7;host=\"a.b:443\";proto=https"
        );
        for gone in ["x-forwarded-port", "x-forwarded-prefix", "x-real-ip"] {
            assert!(h.get(gone).is_none(), "{gone} kept");
        }
        assert_eq!(h["x-forwardedness"], "stays");
        assert_eq!(h["accept"], "*/*");
        let mut h6 = HeaderMap::new();
        add_forwarding(&mut h6, "2001:db8::1".parse().unwrap(), false, "x", false);
        assert_eq!(
            h6["forwarded"],
            "for=\"[2001:db8::1]\";host=\"x\";proto=http"
        );
        let mut u = HeaderMap::new();
        u.insert("connection", HeaderValue::from_static("Upgrade"));
        strip_hop_by_hop(&mut u, Some(HeaderValue::from_static("websocket")));
        assert_eq!(u["connection"], "upgrade");
        assert_eq!(u["upgrade"], "websocket");
    }
}
