//! What every integration test needs: the real server on port 0 with a fresh database
//! (in-process, or as a child process for crash tests), a local task endpoint with
//! misbehaving routes, and a callback receiver that records what it is sent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use doparallel::ServeOptions;
use doparallel::Settings;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// How long any wait in these tests may take before it counts as a failure.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How often [`eventually`] looks again.
const POLL_EVERY: Duration = Duration::from_millis(20);

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    "doparallel=debug,it=debug",
                ))
                .with_test_writer()
                .init();
        }
    });
}

/// Polls `probe` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The secret key of the in-process test servers.
pub const TEST_SECRET_KEY: &str =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// The settings of an in-process test server: loopback endpoints allowed, callbacks retried
/// quickly, no secrets.
pub fn test_settings() -> Settings {
    Settings {
        max_in_flight: 64,
        owner_max_in_flight: None,
        per_host: doparallel::job::HostLimits::UNLIMITED,
        per_host_adaptation: Default::default(),
        priority_max_wait: Duration::from_secs(60),
        group_concurrency: None,
        max_response_bytes: 1024 * 1024,
        callback_schedule: vec![Duration::from_millis(50); 3],
        callback_timeout: Duration::from_secs(5),
        retention: None,
        // The tests' endpoints and receivers listen on loopback.
        egress: std::sync::Arc::new(doparallel::egress::EgressPolicy::guarded(vec![
            "127.0.0.0/8".parse().unwrap(),
        ])),
        callback_signers: Default::default(),
        task_signer: Default::default(),
        sealer: std::sync::Arc::new(doparallel::sealing::Sealer::new(
            Some(doparallel::sealing::SecretKey::parse(TEST_SECRET_KEY).unwrap()),
            None,
        )),
        limits: doparallel::job::Limits::defaults(),
        max_callback_bytes: 10 * 1024 * 1024,
        lease_timeout: Duration::from_secs(30),
        outbound_idle_timeout: Duration::from_secs(30),
        // `serve` reports to its own address.
        public_url: None,
    }
}

/// A client of the API of one server.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// Posts raw bytes with a content type; returns the status and the JSON body.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .body(body.to_owned());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("server answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Submits a job that must be accepted; returns its id.
    pub async fn submit(&self, job: &Value) -> String {
        let (status, body) = self
            .post_raw("/v1/job", Some("application/json"), &job.to_string())
            .await;
        assert_eq!(status, 202, "submit refused: {body}");
        body["job_id"].as_str().unwrap().to_string()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        Self::answer(self.http.get(format!("{}{path}", self.base))).await
    }

    /// `get` with an API token.
    pub async fn get_as(&self, token: &str, path: &str) -> (u16, Value) {
        Self::answer(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(token),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        Self::answer(self.http.delete(format!("{}{path}", self.base))).await
    }

    /// A PUT of raw text (JSON or not).
    pub async fn put(&self, path: &str, body: &str) -> (u16, Value) {
        Self::answer(
            self.http
                .put(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body.to_owned()),
        )
        .await
    }

    /// The status and JSON body (null when there is none) of a request.
    async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = request.send().await.expect("server answers");
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("server answers");
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// The value of one metric line (`name` with its labels, as printed), when present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().await.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.parse().ok()
        })
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "GET job {id}: {body}");
        body
    }

    /// Waits until the job is finished and its callback is no longer pending.
    pub async fn wait_settled(&self, id: &str) -> Value {
        eventually(&format!("job {id} to settle"), || async {
            let job = self.job(id).await;
            let finished = ["Complete", "Failed", "Cancelled"].contains(&job["status"].as_str()?);
            (finished && job["callback"]["state"] != "pending").then_some(job)
        })
        .await
    }

    /// Every task of a job, read through the paginated route.
    pub async fn tasks(&self, id: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let (status, page) = self
                .get(&format!("/v1/jobs/{id}/tasks?after={after}&limit=7"))
                .await;
            assert_eq!(status, 200, "{page}");
            all.extend(page["tasks"].as_array().unwrap().iter().cloned());
            match page["next_after"].as_u64() {
                Some(n) => after = n,
                None => return all,
            }
        }
    }
}

/// The server running in this process on a fresh database.
pub struct TestApp {
    pub api: Api,
    /// Holds the database until the test ends.
    _dir: tempfile::TempDir,
    /// Dropping it shuts the server down.
    _shutdown: oneshot::Sender<()>,
}

/// The limits on incoming connections of an in-process server: the service's defaults.
pub fn listen_limits(max_body_bytes: usize) -> doparallel::listener::ListenLimits {
    doparallel::listener::ListenLimits {
        max_connections: 1000,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        max_body_bytes,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_settings()).await
}

pub async fn spawn_app_with(config: Settings) -> TestApp {
    spawn_app_full(config, Default::default(), 4 * 1024 * 1024).await
}

/// The server with API tokens and a request body limit of its own.
pub async fn spawn_app_full(
    config: Settings,
    tokens: doparallel::auth::ApiTokens,
    max_body_bytes: usize,
) -> TestApp {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let store = doparallel::store::open(&url).await.expect("store opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let options = ServeOptions {
        settings: config,
        shutdown_grace: Duration::from_secs(5),
        listen: listen_limits(max_body_bytes),
        tokens,
        api_only: false,
    };
    tokio::spawn(async move {
        doparallel::serve(listener, store, options, async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    TestApp {
        api: Api::new(addr),
        _dir: dir,
        _shutdown: tx,
    }
}

impl std::ops::Deref for TestApp {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// One call an endpoint received.
#[derive(Clone, Debug)]
pub struct Call {
    pub headers: HeaderMap,
    pub body: String,
    /// When it arrived.
    pub at: Instant,
    /// Calls in flight at this endpoint when it arrived, itself included.
    pub concurrent: u32,
}

impl Call {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

#[derive(Default)]
struct EndpointState {
    calls: Vec<Call>,
    /// Calls per Idempotency-Key per route, for the "fail first" routes.
    seen: HashMap<(String, String), u32>,
    in_flight: u32,
    max_in_flight: u32,
    /// Per job (`DoParallel-Job-Id`): calls in flight now, and the most at once.
    jobs_in_flight: HashMap<String, (u32, u32)>,
    /// Calls of the `/throttle` route so far.
    throttled: u32,
}

/// A call being answered; counted in flight until its handler ends (or is dropped, when the
/// caller goes away).
struct InFlight {
    state: Arc<Mutex<EndpointState>>,
    job: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap();
        s.in_flight -= 1;
        if let Some((now, _)) = s.jobs_in_flight.get_mut(&self.job) {
            *now -= 1;
        }
    }
}

/// A local task endpoint. Routes:
/// `/echo` answers the params; `/text` plain text; `/empty` 204; `/numbers` a JSON of
/// awkward numbers; `/flaky` 500 on a task's first call then 200; `/fail` always 500;
/// `/missing` 404; `/big?n=N` N bytes of text; `/hang` never answers; `/limited` 429 with `Retry-After: 1` on a task's
/// first call, then 200; `/throttle` 429 with `Retry-After: 1` on the route's first call of
/// all, then 200; `/slow?ms=N` answers the params after N ms and `/jitter?ms=N` after a
/// random 0 to N ms; `/accept` 202 (the outcome to be reported later); `/report-first`
/// reports `{"early":PARAMS}` to its result URL, then answers 202. Every call's arrival time
/// and the calls in flight, in all and per job, are recorded.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    state: Arc<Mutex<EndpointState>>,
}

impl Endpoint {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(EndpointState::default()));
        let app = Router::new()
            .route("/{route}", post(endpoint_handler))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Endpoint { addr, state }
    }

    pub fn url(&self, route: &str) -> String {
        format!("http://{}/{route}", self.addr)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn call_count(&self) -> usize {
        self.state.lock().unwrap().calls.len()
    }

    /// Calls being answered now.
    pub fn in_flight(&self) -> u32 {
        self.state.lock().unwrap().in_flight
    }

    pub fn max_in_flight(&self) -> u32 {
        self.state.lock().unwrap().max_in_flight
    }

    /// The most calls of one job in flight at once.
    pub fn max_in_flight_of(&self, job: &str) -> u32 {
        let s = self.state.lock().unwrap();
        s.jobs_in_flight.get(job).map_or(0, |&(_, max)| max)
    }

    /// Calls per Idempotency-Key.
    pub fn calls_per_key(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for call in self.calls() {
            *counts.entry(call.header("idempotency-key")).or_insert(0) += 1;
        }
        counts
    }
}

#[derive(serde::Deserialize)]
struct SlowQuery {
    ms: Option<u64>,
    /// Size of the `/big` answer.
    n: Option<usize>,
}

async fn endpoint_handler(
    State(state): State<Arc<Mutex<EndpointState>>>,
    axum::extract::Path(route): axum::extract::Path<String>,
    Query(query): Query<SlowQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = String::from_utf8_lossy(&body).into_owned();
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let job = headers
        .get("doparallel-job-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let (nth, throttled) = {
        let mut s = state.lock().unwrap();
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        let per_job = s.jobs_in_flight.entry(job.clone()).or_insert((0, 0));
        per_job.0 += 1;
        per_job.1 = per_job.1.max(per_job.0);
        let concurrent = s.in_flight;
        s.calls.push(Call {
            headers: headers.clone(),
            body: body.clone(),
            at: Instant::now(),
            concurrent,
        });
        if route == "throttle" {
            s.throttled += 1;
        }
        let throttled = s.throttled;
        let n = s.seen.entry((route.clone(), key)).or_insert(0);
        *n += 1;
        (*n, throttled)
    };
    let _in_flight = InFlight {
        state: state.clone(),
        job,
    };
    let json = |text: String| ([("content-type", "application/json")], text).into_response();
    match route.as_str() {
        "echo" => json(body),
        "text" => "plain text".into_response(),
        "empty" => StatusCode::NO_CONTENT.into_response(),
        "numbers" => json(r#"{"big":12345678901234567890123,"f":1.10,"e":-0.0e-7}"#.into()),
        "flaky" if nth == 1 => (StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response(),
        "flaky" => json(r#"{"ok":true}"#.into()),
        "fail" => (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(3000)).into_response(),
        "missing" => (StatusCode::NOT_FOUND, "no such thing").into_response(),
        "big" => "x".repeat(query.n.unwrap_or(0)).into_response(),
        "hang" => std::future::pending().await,
        "limited" if nth == 1 => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response(),
        "limited" => json(r#"{"ok":true}"#.into()),
        "throttle" if throttled == 1 => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response(),
        "throttle" => json(r#"{"ok":true}"#.into()),
        // A long-running task: accepted now, its outcome reported later by the test.
        "accept" => StatusCode::ACCEPTED.into_response(),
        // Reports its outcome before it even answers 202.
        "report-first" => {
            let url = headers["doparallel-result-url"]
                .to_str()
                .unwrap()
                .to_string();
            let report = format!(r#"{{"status":"Complete","result":{{"early":{body}}}}}"#);
            let answer = reqwest::Client::new()
                .post(url)
                .body(report)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
            StatusCode::ACCEPTED.into_response()
        }
        "slow" | "jitter" => {
            let ms = query.ms.unwrap_or(50);
            let ms = if route == "jitter" {
                rand::random_range(0..=ms)
            } else {
                ms
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(body)
        }
        _ => StatusCode::IM_A_TEAPOT.into_response(),
    }
}

/// One callback delivery attempt as received.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub webhook_id: String,
    pub headers: HeaderMap,
    pub answered: u16,
    pub body: Value,
    /// The body as sent, for checking its signature.
    pub raw: Bytes,
}

/// A callback receiver that answers `fail_first` attempts with `fail_status`, then 200.
pub struct Receiver {
    pub addr: SocketAddr,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    log: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    pub async fn start(fail_first: usize, fail_status: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(
            listener,
            move |n| {
                if n <= fail_first { fail_status } else { 200 }
            },
        )
    }

    /// A receiver on `addr` (port 0: any) that gives `answers` to the first attempts, in
    /// turn, and 200 to the rest. A test can let a callback fail on a free port first, then
    /// start the receiver there.
    pub async fn start_at(addr: SocketAddr, answers: Vec<u16>) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Self::serve(listener, move |n| {
            answers.get(n - 1).copied().unwrap_or(200)
        })
    }

    /// Serves on `listener`, answering the `n`th attempt (from 1) with `answer(n)`.
    fn serve(
        listener: tokio::net::TcpListener,
        answer: impl Fn(usize) -> u16 + Clone + Send + Sync + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let counter = Arc::new(Mutex::new(0usize));
        let handler_log = log.clone();
        let app = Router::new().route(
            "/cb",
            post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                let counter = counter.clone();
                let log = handler_log.clone();
                let answer = answer.clone();
                async move {
                    let n = {
                        let mut c = counter.lock().unwrap();
                        *c += 1;
                        *c
                    };
                    let answered = answer(n);
                    let delivery = Delivery {
                        webhook_id: headers
                            .get("webhook-id")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default(),
                        headers: headers.clone(),
                        answered,
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        raw: body,
                    };
                    log.lock().unwrap().push(delivery.clone());
                    let _ = tx.send(delivery);
                    StatusCode::from_u16(answered).unwrap()
                }
            }),
        );
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            addr,
            deliveries: rx,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }

    /// The next delivery attempt, failing the test after [`DEADLINE`].
    pub async fn next(&mut self) -> Delivery {
        tokio::time::timeout(DEADLINE, self.deliveries.recv())
            .await
            .expect("a callback arrives in time")
            .expect("receiver is running")
    }

    pub fn all(&self) -> Vec<Delivery> {
        self.log.lock().unwrap().clone()
    }
}

/// One request a [`RawEndpoint`] received.
#[derive(Clone, Debug)]
pub struct RawCall {
    pub at: Instant,
    /// The request line and headers, as sent.
    head: String,
    /// The body (as long as its `content-length`).
    pub body: Vec<u8>,
}

impl RawCall {
    /// The method of the request line.
    pub fn method(&self) -> &str {
        self.head.split(' ').next().unwrap_or_default()
    }

    /// The path of the request line.
    pub fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> String {
        self.head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    }
}

/// Most connections a [`RawEndpoint`] accepts; enough for any test here.
const RAW_MAX_CONNECTIONS: usize = 1000;

/// A task endpoint on a bare TCP socket, for the answers no HTTP library will give: a
/// reset, a body that drips or stops short, bytes that are not UTF-8. Each connection's
/// request is read whole and recorded, then `behave(n, call, stream)` answers it (`n`
/// counts requests from 1); the connection is closed when `behave` returns. Everything it runs
/// stops when it is dropped.
pub struct RawEndpoint {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<RawCall>>>,
    server: tokio::task::AbortHandle,
}

impl RawEndpoint {
    pub async fn start<F, Fut>(behave: F) -> Self
    where
        F: Fn(usize, RawCall, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let behave = Arc::new(behave);
        let server = tokio::spawn(async move {
            // Dropped with the accept loop, which aborts every connection still open.
            let mut connections = tokio::task::JoinSet::new();
            for _ in 0..RAW_MAX_CONNECTIONS {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                let behave = behave.clone();
                connections.spawn(async move {
                    let Ok(Some((head, body))) =
                        tokio::time::timeout(DEADLINE, read_request(&mut stream)).await
                    else {
                        return;
                    };
                    let call = RawCall {
                        at: Instant::now(),
                        head,
                        body,
                    };
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push(call.clone());
                        log.len()
                    };
                    behave(n, call, stream).await;
                });
            }
            // Keeps the last connections open until the endpoint is dropped.
            while connections.join_next().await.is_some() {}
        })
        .abort_handle();
        RawEndpoint {
            addr,
            calls,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn calls(&self) -> Vec<RawCall> {
        self.calls.lock().unwrap().clone()
    }

    pub fn call_count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

impl Drop for RawEndpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Reads one request (head and a `content-length` body) and returns its head and body;
/// `None` when the peer goes away first or the head is unreasonably long.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    const MAX_REQUEST: usize = 1024 * 1024;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let call = RawCall {
        at: Instant::now(),
        head,
        body: Vec::new(),
    };
    let length: usize = call.header("content-length").parse().unwrap_or(0);
    let length = length.min(MAX_REQUEST);
    while buf.len() < end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((call.head, buf[end..end + length].to_vec()))
}

/// Writes a whole response that closes the connection: status line (`"200 OK"`), headers,
/// the body and its length.
pub async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    use tokio::io::AsyncWriteExt;
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    )
    .into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    // The client may have gone (a timeout): nothing to do about it here.
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// A `doparallel serve` child process, for the tests that kill it.
pub struct ServerProcess {
    pub child: Child,
    pub api: Api,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_doparallel")
}

/// How a `doparallel serve` process is started: every test that runs the binary as a
/// server goes through here. It listens on a free loopback port, may call loopback
/// endpoints, and retries callbacks quickly, unless the arguments say otherwise.
pub struct ServerBuilder {
    url: String,
    listen: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: Option<PathBuf>,
    open_files: Option<u64>,
}

impl ServerBuilder {
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// Extra environment variables (`FAILPOINTS` for the injected-fault tests).
    pub fn envs(mut self, env: &[(&str, &str)]) -> Self {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Copies every stderr line of the server to `path`.
    pub fn log(mut self, path: &Path) -> Self {
        self.log = Some(path.to_path_buf());
        self
    }

    /// The server's open-file limit, soft and hard.
    pub fn open_files(mut self, files: u64) -> Self {
        self.open_files = Some(files);
        self
    }

    fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(binary());
        if let Some(files) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit only, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: files,
                        rlim_max: files,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command
            .arg("serve")
            .args(["--listen", &self.listen])
            .args(["--database", &self.url])
            .args(["--callback-retry-schedule", "50ms,50ms,50ms"])
            .args(["--allow-net", "127.0.0.0/8"])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs a server that must refuse to start: checks that it exits with the usage error
    /// code, and returns what it said.
    pub fn refused(self) -> String {
        let out = self.command().output().expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        stderr
    }

    /// Starts the server and waits for its `listening on ADDR` line.
    pub fn start(self) -> ServerProcess {
        let mut child = self
            .command()
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log;
        // Drains stderr for the life of the process, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let echo = std::env::var_os("TEST_LOG").is_some();
            let mut copy = log.map(|path| std::fs::File::create(path).unwrap());
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[server] {line}");
                }
                if let Some(file) = copy.as_mut() {
                    use std::io::Write;
                    writeln!(file, "{line}").unwrap();
                }
                if let Some(rest) = line.split("listening on ").nth(1) {
                    // The address ends where its characters do (a JSON log line goes on).
                    let end = rest
                        .find(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c)))
                        .unwrap_or(rest.len());
                    let _ = tx.send(rest[..end].parse::<SocketAddr>().unwrap());
                }
            }
        });
        let addr = rx
            .recv_timeout(DEADLINE)
            .expect("the server logs its address");
        ServerProcess {
            child,
            api: Api::new(addr),
        }
    }
}

impl ServerProcess {
    /// A server on the database at `url` (any backend), to be configured and started.
    pub fn on_url(url: &str) -> ServerBuilder {
        ServerBuilder {
            url: url.to_string(),
            listen: "127.0.0.1:0".to_string(),
            args: Vec::new(),
            env: Vec::new(),
            log: None,
            open_files: None,
        }
    }

    /// A server on the SQLite database at `db`.
    pub fn on(db: &Path) -> ServerBuilder {
        Self::on_url(&sqlite_url(db))
    }

    /// The common case: a server on the SQLite database at `db` with extra arguments.
    pub fn start(db: &Path, extra: &[&str]) -> Self {
        Self::on(db).args(extra).start()
    }

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("doparallel.db")
}

pub fn sqlite_url(db: &Path) -> String {
    format!("sqlite://{}", db.display())
}

/// Fails the test unless SQLite's `PRAGMA integrity_check` finds the database sound. Opens
/// it read-only, so it changes nothing that the next start would see.
pub async fn assert_database_intact(db: &Path) {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("the database opens");
    let verdict: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .expect("integrity_check runs");
    assert_eq!(verdict, ["ok"], "integrity_check of {}", db.display());
    conn.close().await.unwrap();
}

/// A job of `n` tasks to `url`, task i carrying params `{"i": i}`.
pub fn job_of(n: usize, url: &str, callback: Option<&str>, options: Value) -> Value {
    let tasks: Vec<Value> = (1..=n)
        .map(|i| json!({"endpoint": url, "params": {"i": i}}))
        .collect();
    let mut job = json!({"tasks": tasks, "options": options});
    if let Some(cb) = callback {
        job["callback"] = json!(cb);
    }
    job
}
