//! The outgoing HTTP client that every task call and callback shares, and what keeps its
//! sockets from taking every file descriptor.
//!
//! Idle connections are kept per endpoint `host:port` for `--outbound-idle-timeout` (not
//! reqwest's 90 s), at most `--max-in-flight` per host. A job over a thousand ports still
//! leaves up to a thousand idle sockets behind for that long, and reqwest's pool has no
//! overall cap nor a hook that would let one be counted. So when the process runs out of
//! descriptors (a call's connect or the listener's accept fails with EMFILE), the client is
//! replaced: the old one's pool, idle sockets and all, is dropped as soon as the calls
//! still using it end. A call that met EMFILE waits and tries again rather than fail
//! (`call::send`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::EngineConfig;

/// The least time between two replacements of the client.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Outbound {
    config: EngineConfig,
    current: Mutex<(reqwest::Client, Instant)>,
}

impl Outbound {
    pub(crate) fn new(config: &EngineConfig) -> Result<Arc<Self>, reqwest::Error> {
        let client = build(config)?;
        Ok(Arc::new(Outbound {
            config: config.clone(),
            current: Mutex::new((client, Instant::now())),
        }))
    }

    /// The client for the next request.
    pub(crate) fn client(&self) -> reqwest::Client {
        self.current.lock().expect("not poisoned").0.clone()
    }

    /// Every descriptor is in use: replaces the client, so that its idle sockets close once
    /// the calls that use it end (at most once a second, however many calls ask).
    pub(crate) fn out_of_descriptors(&self) {
        let mut current = self.current.lock().expect("not poisoned");
        if current.1.elapsed() < REPLACE_AT_MOST_EVERY {
            return;
        }
        match build(&self.config) {
            Ok(client) => {
                tracing::warn!("out of file descriptors: dropping the idle outgoing connections");
                *current = (client, Instant::now());
            }
            Err(e) => tracing::error!(error = %e, "cannot build a new HTTP client"),
        }
    }
}

fn build(config: &EngineConfig) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(config)
        .pool_idle_timeout(config.outbound_idle_timeout)
        // As many idle connections per host as calls can be in flight: a claim starts many
        // calls to one host at once, and each should find a connection rather than open one
        // (with 64, the benchmark's W2, 1,000 concurrent calls to one host, took 0.94 s
        // instead of 0.86 s).
        // Idle ones still go after the idle timeout, and at once when descriptors run out.
        .pool_max_idle_per_host(config.max_in_flight)
        .tcp_nodelay(true)
        .build()
}

/// The settings every outbound client shares: no redirects, and the address guard in its
/// resolver (so the connection goes to the address that was checked).
pub(crate) fn client_builder(config: &EngineConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the target's name itself, out of the guard's sight.
        .no_proxy()
        .user_agent(concat!("doparallel/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(crate::egress::GuardedResolver::new(
            config.egress.clone(),
        )))
}

/// Whether an error comes from this process having no file descriptor left (EMFILE) or the
/// system none (ENFILE).
pub(crate) fn out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(code) if code == libc::EMFILE || code == libc::ENFILE)
        {
            return true;
        }
        source = err.source();
    }
    false
}
