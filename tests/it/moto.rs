//! moto's DynamoDB server, for the tests of the DynamoDB backend: started once per test
//! binary on a free loopback port, a fresh table per test, killed by its pid when the
//! binary exits (and by the kernel if the binary dies first).
//!
//! moto implements conditional writes and TransactWriteItems with cancellation reasons,
//! which the backend relies on; `tests/dynamodb/moto_server.py` runs it one request at a
//! time, since its own server does not isolate concurrent conditional writes as DynamoDB
//! does. Outside CI a machine without it skips these tests with a
//! notice; with `CI=true` a missing moto fails them (`.ci/run` installs it).

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// A running moto server.
pub struct Moto {
    pub port: u16,
}

static MOTO: OnceLock<Option<Moto>> = OnceLock::new();
static PID: AtomicI32 = AtomicI32::new(0);

/// The test credentials and region, set in this process (so its children get them too).
pub const ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    // Never ask an instance metadata endpoint for credentials or a region.
    ("AWS_EC2_METADATA_DISABLED", "true"),
    // No profile file of the machine's user.
    ("AWS_CONFIG_FILE", "/dev/null"),
];

/// Sets [`ENV`] in this process, once.
pub fn set_test_env() {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        for (key, value) in ENV {
            // SAFETY: set once, before any AWS client exists, by the first test that needs
            // them; the other tests read the environment only through std, which locks it.
            unsafe { std::env::set_var(key, value) };
        }
    });
}

/// The server, or `None` (after a loud notice) when moto is not installed outside CI.
pub fn moto() -> Option<&'static Moto> {
    MOTO.get_or_init(start).as_ref()
}

fn start() -> Option<Moto> {
    let installed = Command::new("python3")
        .args(["-c", "import moto.server, flask, flask_cors"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        let why = "moto[server] is not installed (python3 -m pip install 'moto[server]==5.2.1')";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}; CI needs it for the DynamoDB tests");
        }
        eprintln!("\n!!!!!!!!\n!!! SKIPPING the DynamoDB tests: {why}\n!!!!!!!!\n");
        return None;
    }
    set_test_env();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // PR_SET_PDEATHSIG fires when the thread that started the child ends, so the child is
    // started by a thread that lives as long as this process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("python3");
        command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/dynamodb/moto_server.py"
            ))
            .args(["127.0.0.1", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("python3 starts");
        tx.send(child.id()).unwrap();
        let _ = child.wait();
    });
    let pid = rx.recv().unwrap();
    PID.store(pid as i32, Ordering::SeqCst);
    // SAFETY: registers a plain function that only calls kill(2).
    unsafe { libc::atexit(kill_moto) };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "moto did not start listening on 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Moto { port })
}

extern "C" fn kill_moto() {
    let pid = PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: the pid of the child this process started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

impl Moto {
    /// The database URL of a table name on this server.
    pub fn url(&self, table: &str) -> String {
        format!(
            "dynamodb://{table}?region=us-east-1&endpoint=http://127.0.0.1:{}",
            self.port
        )
    }
}

/// A new table of its own for one test (created as `doparallel migrate` does), or `None`
/// when the DynamoDB tests are skipped.
pub async fn fresh_table() -> Option<String> {
    let moto = moto()?;
    let url = moto.url(&format!("dp-{:016x}", rand::random::<u64>()));
    doparallel::store::migrate(&url)
        .await
        .expect("the table is created");
    Some(url)
}

/// What a [`FaultyProxy`] does to a request its rule picks.
#[derive(Clone, Copy, Debug)]
pub enum ProxyFault {
    /// moto applies the request, then the connection is reset: its answer is lost.
    ResetAfter,
    /// The proxy answers 500 with a body of its own, as a load balancer in trouble does,
    /// and moto never sees the request.
    Error500,
    /// The request reaches moto this much later (not counted as faulted).
    Delay(Duration),
}

/// A rule: which requests, what to do to them, and how many more times.
type Rule = (Matcher, ProxyFault, usize);

/// Picks the requests to fault: given the `X-Amz-Target` operation (`TransactWriteItems`)
/// and the body.
type Matcher = Box<dyn Fn(&str, &str) -> bool + Send>;

/// An HTTP/1.1 proxy on loopback in front of moto that loses the answers or fails the
/// requests a rule picks, for the DynamoDB fault tests: the SDK and the store meet a real
/// reset connection or a real 5xx.
pub struct FaultyProxy {
    pub port: u16,
    rules: std::sync::Arc<std::sync::Mutex<Vec<Rule>>>,
    faulted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Requests held up by a `Delay` so far (counted as their wait begins).
    delayed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultyProxy {
    pub async fn start(moto: &Moto) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = format!("http://127.0.0.1:{}", moto.port);
        let rules: std::sync::Arc<std::sync::Mutex<Vec<Rule>>> = Default::default();
        let faulted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let delayed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (shared_rules, count, held) = (rules.clone(), faulted.clone(), delayed.clone());
        let http = reqwest::Client::new();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (rules, count, held, http, upstream) = (
                    shared_rules.clone(),
                    count.clone(),
                    held.clone(),
                    http.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = vec![0u8; 64 * 1024];
                    loop {
                        // One request: its head, then a Content-Length body.
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                        let headers: Vec<(String, String)> = head
                            .lines()
                            .skip(1)
                            .filter_map(|l| l.split_once(':'))
                            .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_string()))
                            .collect();
                        let header = |name: &str| {
                            headers
                                .iter()
                                .find(|(n, _)| n == name)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        };
                        let length: usize = header("content-length").parse().unwrap_or(0);
                        while buf.len() < head_end + length {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body = buf[head_end..head_end + length].to_vec();
                        buf.drain(..head_end + length);
                        let target = header("x-amz-target");
                        let operation = target.rsplit('.').next().unwrap_or_default().to_string();
                        // The first rule that picks the request and has turns left.
                        let fault = {
                            let mut rules = rules.lock().unwrap();
                            let text = String::from_utf8_lossy(&body);
                            rules
                                .iter_mut()
                                .find(|(matches, _, left)| *left > 0 && matches(&operation, &text))
                                .map(|(_, fault, left)| {
                                    *left -= 1;
                                    *fault
                                })
                        };
                        if let Some(ProxyFault::Delay(by)) = fault {
                            held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(by).await;
                        }
                        if let Some(ProxyFault::Error500) = fault {
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let answer = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\nproxy trouble";
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let mut request = http.post(format!("{upstream}/")).body(body);
                        for (name, value) in &headers {
                            if !["host", "content-length", "connection"].contains(&name.as_str()) {
                                request = request.header(name, value);
                            }
                        }
                        let Ok(answer) = request.send().await else {
                            return;
                        };
                        let status = answer.status();
                        let answer_headers = answer.headers().clone();
                        let Ok(answer_body) = answer.bytes().await else {
                            return;
                        };
                        if let Some(ProxyFault::ResetAfter) = fault {
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            // Applied by moto; the answer never arrives. A zero linger
                            // resets the connection when dropped (it does not block then,
                            // which is what the deprecation warns of).
                            #[allow(deprecated)]
                            let _ = stream.set_linger(Some(Duration::ZERO));
                            return;
                        }
                        let mut out = format!(
                            "HTTP/1.1 {} {}\r\ncontent-length: {}\r\n",
                            status.as_u16(),
                            status.canonical_reason().unwrap_or(""),
                            answer_body.len()
                        );
                        for (name, value) in &answer_headers {
                            if !["content-length", "connection", "transfer-encoding"]
                                .contains(&name.as_str())
                            {
                                out.push_str(&format!(
                                    "{name}: {}\r\n",
                                    value.to_str().unwrap_or_default()
                                ));
                            }
                        }
                        out.push_str("\r\n");
                        let mut bytes = out.into_bytes();
                        bytes.extend_from_slice(&answer_body);
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FaultyProxy {
            port,
            rules,
            faulted,
            delayed,
        }
    }

    /// The database URL of `table` through this proxy.
    pub fn url(&self, table_url: &str) -> String {
        let (base, _) = table_url.split_once("&endpoint=").unwrap();
        format!("{base}&endpoint=http://127.0.0.1:{}", self.port)
    }

    /// From now on, faults the next `times` requests that `matches` picks and no rule armed
    /// before picks.
    pub fn arm(
        &self,
        matches: impl Fn(&str, &str) -> bool + Send + 'static,
        fault: ProxyFault,
        times: usize,
    ) {
        self.rules
            .lock()
            .unwrap()
            .push((Box::new(matches), fault, times));
    }

    /// How many requests were faulted so far.
    pub fn faulted(&self) -> usize {
        self.faulted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests a `Delay` rule has begun to hold up.
    pub fn delayed(&self) -> usize {
        self.delayed.load(std::sync::atomic::Ordering::SeqCst)
    }
}
