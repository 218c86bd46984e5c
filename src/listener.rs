//! Incoming connections: the accept loop in front of the API's router, with the limits a
//! server on an open network needs before any request is authenticated.
//!
//! - At most `max_connections` are open at once; one past them is closed as soon as it is
//!   accepted, so the excess is refused while the listener keeps accepting (and the file
//!   descriptors left go to task calls, callbacks and the database).
//! - A request head must arrive within `header_timeout`: counted from the accept for a new
//!   connection (one that sends nothing is closed too), and from its first byte for the
//!   next request on a kept-alive connection.
//! - A kept-alive connection with no request is closed after `idle_timeout`.
//! - A request body must arrive whole within `body_timeout` (`408`); a `Content-Length`
//!   over `max_body_bytes` is answered `413` before any of the body is read, so no
//!   `100 Continue` invites it.
//! - At shutdown, no new connection is accepted, open ones finish their request within the
//!   grace period, and every connection still open after it is closed, a half-sent request
//!   included.
//!
//! HTTP/1.1 only (hyper's `http1`); the watchdog of each connection is [`Activity`], which
//! hyper's own header timeout cannot replace: it also runs while a kept-alive connection
//! waits, which would make the idle timeout the header timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The limits on incoming connections; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct ListenLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_body_bytes: usize,
}

/// What the listener counts, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub refused: Counter,
    pub timed_out: Counter,
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains: open connections get
/// `grace` to finish their requests, and are closed after it. `out_of_descriptors` is
/// called when an accept fails for want of a file descriptor (so that idle outgoing
/// connections can be let go).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenLimits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    out_of_descriptors: impl Fn(),
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let stopping = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut last_accept_error: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        // Closed at once: refused, without holding a descriptor any longer.
                        metrics.refused.inc();
                        tracing::debug!("connection refused: --max-connections are open");
                        continue;
                    };
                    let (app, metrics, stopping) = (app.clone(), metrics.clone(), stopping.clone());
                    connections.spawn(async move {
                        metrics.open.inc();
                        serve_connection(stream, app, limits, &metrics, stopping).await;
                        metrics.open.dec();
                        drop(permit);
                    });
                }
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(code) if code == libc::EMFILE || code == libc::ENFILE) {
                        out_of_descriptors();
                    }
                    // Out of file descriptors, most likely: wait a little rather than spin,
                    // and say so at most once a second.
                    if last_accept_error.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                        tracing::error!(error = %e, "accepting a connection failed");
                        last_accept_error = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    stopping.cancel();
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "grace period over; closing the connections still open"
        );
        connections.shutdown().await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: ListenLimits,
    metrics: &ConnectionMetrics,
    stopping: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let io = hyper_util::rt::TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let in_flight = service_activity.request_started();
        let app = app.clone();
        async move {
            let response = handle(app, request.map(Body::new), limits).await;
            // The request counts as in flight until its response body has been sent.
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(Tracked {
                    inner: body,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = stopping.cancelled(), if !draining => {
                // Finishes the request under way, if any, then closes.
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            () = activity.expired(&limits) => {
                metrics.timed_out.inc();
                return;
            }
        }
    }
}

/// One request: its body read within the limits, then the router.
async fn handle(app: Router, request: Request<Body>, limits: ListenLimits) -> Response<Body> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        // Before reading anything: hyper sends `100 Continue` only once a body is read.
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than the server accepts (--max-body-bytes)",
        );
    }
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, limits.max_body_bytes);
    let bytes = match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body is larger than the server accepts (--max-body-bytes)",
            );
        }
        Err(_) => {
            return refusal(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time (--body-timeout)",
            );
        }
    };
    match app
        .oneshot(Request::from_parts(parts, Body::from(bytes)))
        .await
    {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// An error answer from the listener itself, in the API's error shape; the connection is
/// closed after it (what is left of a refused body is never read).
fn refusal(status: StatusCode, msg: &str) -> Response<Body> {
    let body = serde_json::json!({"status": "Error", "msg": msg}).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONNECTION, "close")
        .body(Body::from(body))
        .expect("a valid response")
}

/// What a connection is doing, for its watchdog: requests in flight, and since when it has
/// waited for the next request head (and whether any of it has arrived).
#[derive(Clone)]
struct Activity(Arc<ActivityState>);

struct ActivityState {
    inner: Mutex<Waiting>,
    changed: Notify,
}

struct Waiting {
    requests: usize,
    /// When the connection began to wait for a request: its accept, or the end of the last
    /// response.
    since: Instant,
    /// Whether it has waited before (a kept-alive connection), so that silence is idleness
    /// rather than a head that does not come.
    kept_alive: bool,
    /// When the first byte of the next request came, while waiting.
    head_started: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(ActivityState {
            inner: Mutex::new(Waiting {
                requests: 0,
                since: Instant::now(),
                kept_alive: false,
                head_started: None,
            }),
            changed: Notify::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.0.inner.lock().expect("not poisoned")
    }

    fn bytes_read(&self) {
        let mut w = self.lock();
        if w.requests == 0 && w.head_started.is_none() {
            w.head_started = Some(Instant::now());
            drop(w);
            self.0.changed.notify_one();
        }
    }

    fn request_started(&self) -> InFlight {
        let mut w = self.lock();
        w.requests += 1;
        w.head_started = None;
        drop(w);
        self.0.changed.notify_one();
        InFlight(self.clone())
    }

    /// Resolves when the connection has waited too long: for a request head, or idle.
    /// Never while a request is in flight.
    async fn expired(&self, limits: &ListenLimits) {
        loop {
            let deadline = {
                let w = self.lock();
                if w.requests > 0 {
                    None
                } else if let Some(started) = w.head_started {
                    Some(started + limits.header_timeout)
                } else if w.kept_alive {
                    Some(w.since + limits.idle_timeout)
                } else {
                    Some(w.since + limits.header_timeout)
                }
            };
            let changed = self.0.changed.notified();
            match deadline {
                None => changed.await,
                Some(deadline) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(deadline) => {
                            // Still the same wait (nothing notified in between)?
                            let w = self.lock();
                            if w.requests == 0 {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A request in flight, until its response has been sent.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut w = self.0.lock();
        w.requests -= 1;
        if w.requests == 0 {
            w.since = Instant::now();
            w.kept_alive = true;
            w.head_started = None;
        }
        drop(w);
        self.0.0.changed.notify_one();
    }
}

/// A response body that holds its request's [`InFlight`] until it ends.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's socket, telling its [`Activity`] when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
