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
    for (key, value) in ENV {
        // SAFETY: set once, before any AWS client exists, by the first DynamoDB test; the
        // other tests read the environment only through std, which locks it.
        unsafe { std::env::set_var(key, value) };
    }
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
