//! A throwaway PostgreSQL cluster for the tests that need one: started once per run of this
//! test binary (`initdb` and `pg_ctl` in a temporary directory, in memory under /dev/shm
//! when there is one, listening on 127.0.0.1 only, trust authentication, `fsync=off` since
//! nothing here outlives the run), with a fresh database per test, and stopped when the
//! binary exits.
//!
//! Without PostgreSQL (no `initdb` on PATH nor under /usr/lib/postgresql/*/bin) the tests
//! that need it are skipped with a notice on stderr; in CI (`CI=true`) they fail instead.
//! `initdb` refuses to run as root, so as root the cluster runs as the `postgres` user.
//!
//! The benchmark (`benches/e2e.rs`) uses this module too, with `DOPARALLEL_PG_DURABLE=1`:
//! then the cluster is on disk with `fsync` on, as durable as the SQLite it is compared to.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;

/// The superuser initdb creates; tests connect as it.
const SUPERUSER: &str = "postgres";

/// A running cluster.
pub struct Cluster {
    pub port: u16,
    /// The temporary directory: the data directory, the socket and the server's log.
    pub dir: PathBuf,
}

impl Cluster {
    /// The URL of a database of this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's log (statements of a database with `log_statement` set go there).
    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

/// A fresh, empty database of the shared cluster, for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub cluster: &'static Cluster,
}

impl TestDb {
    /// A store on this database (its schema is created by the first one).
    pub async fn store(&self) -> std::sync::Arc<dyn doparallel::store::Store> {
        doparallel::store::open(&self.url)
            .await
            .expect("the PostgreSQL store opens")
    }

    /// Runs one statement on this database as the superuser.
    pub async fn execute(&self, sql: &str) {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }

    /// The one number a query answers, read as the superuser.
    pub async fn query_scalar(&self, sql: &str) -> i64 {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        let n = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        n
    }
}

/// A new database on the shared cluster, or `None` when PostgreSQL is not installed here
/// (outside CI only: in CI that fails the test).
pub async fn database() -> Option<TestDb> {
    let Some(cluster) = cluster() else {
        // Straight to stderr: the test harness keeps what `eprintln!` prints in a passing
        // test to itself.
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test} needs PostgreSQL, which is not installed here"
        );
        return None;
    };
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let name = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut admin = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .expect("the test cluster answers");
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("CREATE DATABASE");
    admin.close().await.unwrap();
    Some(TestDb {
        url: cluster.url(&name),
        name,
        cluster,
    })
}

/// The cluster of this run, started on first use.
pub fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let Some(bin) = find_bin() else {
                missing(
                    "initdb and pg_ctl were not found on PATH nor under /usr/lib/postgresql/*/bin",
                );
                return None;
            };
            Some(start(&bin))
        })
        .as_ref()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Outside CI a missing PostgreSQL skips the tests that need it, loudly; in CI it fails.
fn missing(why: &str) {
    if in_ci() {
        panic!(
            "PostgreSQL is required in CI (CI=true) but {why}; .ci/run installs Debian's postgresql package"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: the PostgreSQL tests do not run: {why} (install Debian's postgresql package to run them)"
    );
}

/// The directory holding `initdb` and `pg_ctl`: PATH first, then Debian's
/// /usr/lib/postgresql/VERSION/bin, newest version first.
fn find_bin() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_both(d))
    {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The user the server runs as: this one, or `postgres` when this is root.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new(SUPERUSER).unwrap();
    // SAFETY: a NUL-terminated name; the record is read at once, before any other getpw call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root, and initdb refuses root, but there is no `postgres` user to run the test cluster as (Debian's postgresql package creates it)"
    );
    // SAFETY: checked non-null just above.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn command(bin: &Path, program: &str, user: Option<(u32, u32)>, dir: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin.join(program));
    cmd.current_dir(dir).env("LC_ALL", "C").stdin(Stdio::null());
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// What the exit handler stops: the postmaster's pid and the directory to remove.
static RUNNING: Mutex<Option<(i32, PathBuf)>> = Mutex::new(None);

fn start(bin: &Path) -> Cluster {
    let started = Instant::now();
    let user = server_user();
    let durable = std::env::var_os("DOPARALLEL_PG_DURABLE").is_some();
    let (dir, data) = init(bin, user, durable);
    // The port is free when looked at; another process may take it before the server
    // binds, so a failed start is tried again on another.
    let mut last_error = String::new();
    for _ in 0..5 {
        let port = free_port();
        match pg_ctl_start(bin, user, &dir, port) {
            Ok(()) => {
                let pid = postmaster_pid(&data).expect("postmaster.pid names the server");
                *RUNNING.lock().unwrap() = Some((pid, dir.clone()));
                // SAFETY: registers a plain extern "C" function with no captured state.
                unsafe { libc::atexit(stop_at_exit) };
                watchdog(&dir);
                eprintln!(
                    "test PostgreSQL cluster on 127.0.0.1:{port} in {} (started in {:.1}s)",
                    dir.display(),
                    started.elapsed().as_secs_f64()
                );
                return Cluster { port, dir };
            }
            Err(e) => last_error = e,
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    panic!("the test PostgreSQL cluster did not start: {last_error}");
}

/// A new cluster's directory (its data directory under `data/`, owned by `user`), made by
/// initdb and configured for the tests.
fn init(bin: &Path, user: Option<(u32, u32)>, durable: bool) -> (PathBuf, PathBuf) {
    // In memory when the system has a tmpfs for it: nothing here outlives the run, and
    // CREATE DATABASE (a database per test) is ten times faster there than on a slow disk.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() && !durable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("doparallel-pg-")
        .tempdir_in(base)
        .expect("a temporary directory")
        .keep();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .expect("chown the cluster's directory");
    }
    let data = dir.join("data");
    let out = command(bin, "initdb", user, &dir)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .expect("initdb runs");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Loopback only, the socket in our directory, a prefix that names each line's database
    // (the idle-rate test counts statements by it), and no fsync: nothing here is kept.
    let conf = format!(
        "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = {}\n\
         max_connections = 300\nlog_line_prefix = '%m [%p] %d '\n",
        dir.display(),
        if durable { "on" } else { "off" }
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
        .expect("postgresql.conf is writable");
    (dir, data)
}

/// Starts the cluster in `dir` on `port` and waits until it accepts connections.
fn pg_ctl_start(bin: &Path, user: Option<(u32, u32)>, dir: &Path, port: u16) -> Result<(), String> {
    let log = dir.join("server.log");
    let out = command(bin, "pg_ctl", user, dir)
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "60", "-o"])
        .arg(format!("-p {port}"))
        .arg("start")
        .stdout(Stdio::null())
        .output()
        .expect("pg_ctl runs");
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    ))
}

/// Stops the cluster in `dir` at once, as a crash would (`pg_ctl stop -m immediate`).
fn pg_ctl_stop(bin: &Path, user: Option<(u32, u32)>, dir: &Path) {
    let out = command(bin, "pg_ctl", user, dir)
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-m", "immediate", "-w", "stop"])
        .stdout(Stdio::null())
        .output()
        .expect("pg_ctl runs");
    assert!(
        out.status.success(),
        "pg_ctl stop failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cluster of one test's own, which that test may stop and start again as a database
/// outage would (the shared cluster serves every other test meanwhile). Stopped and
/// removed when dropped.
pub struct PrivateCluster {
    bin: PathBuf,
    user: Option<(u32, u32)>,
    dir: PathBuf,
    pub port: u16,
}

impl PrivateCluster {
    /// A new running cluster, or `None` (after the same notice as [`database`]) where
    /// PostgreSQL is not installed outside CI.
    pub fn start() -> Option<Self> {
        let Some(bin) = find_bin() else {
            missing("initdb and pg_ctl were not found on PATH nor under /usr/lib/postgresql/*/bin");
            return None;
        };
        let user = server_user();
        let (dir, _) = init(&bin, user, false);
        watchdog(&dir);
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            match pg_ctl_start(&bin, user, &dir, port) {
                Ok(()) => {
                    return Some(PrivateCluster {
                        bin,
                        user,
                        dir,
                        port,
                    });
                }
                Err(e) => last_error = e,
            }
        }
        panic!("a private PostgreSQL cluster did not start: {last_error}");
    }

    /// The URL of the `postgres` database of this cluster.
    pub fn url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once, as a crash or a lost host would.
    pub fn stop(&self) {
        pg_ctl_stop(&self.bin, self.user, &self.dir);
    }

    /// Starts the server again, on the same port.
    pub fn start_again(&self) {
        pg_ctl_start(&self.bin, self.user, &self.dir, self.port)
            .expect("the private cluster starts again");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if postmaster_pid(&self.dir.join("data")).is_some() {
            let _ = command(&self.bin, "pg_ctl", self.user, &self.dir)
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn postmaster_pid(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Stops the cluster when the test binary exits: an immediate shutdown (SIGQUIT to the
/// postmaster, what `pg_ctl stop -m immediate` sends), then its directory is removed.
extern "C" fn stop_at_exit() {
    let Some((pid, dir)) = RUNNING.lock().ok().and_then(|mut r| r.take()) else {
        return;
    };
    // SAFETY: the pid of the postmaster this process started; its pid file says it still runs.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only asks whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Should this process die without running its exit handlers (SIGKILL, abort), a small
/// shell process stops the cluster in `dir` once this one is gone (whichever postmaster
/// runs there then: a private cluster may have been started again). It gives up after two
/// hours.
fn watchdog(dir: &Path) {
    let me = std::process::id();
    let script = format!(
        "i=0; while kill -0 {me} 2>/dev/null && [ $i -lt 7200 ]; do sleep 1; i=$((i+1)); done; \
         if [ -f '{dir}/data/postmaster.pid' ]; then kill -QUIT $(head -n 1 '{dir}/data/postmaster.pid') 2>/dev/null; sleep 2; fi; \
         [ -d '{dir}/data' ] && rm -rf '{dir}'",
        dir = dir.display()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}
