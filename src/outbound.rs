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

use crate::egress::EgressPolicy;

/// What the outgoing client is built with.
#[derive(Clone, Debug)]
pub struct OutboundSettings {
    /// Which addresses calls and callbacks may reach.
    pub egress: Arc<EgressPolicy>,
    /// How long an idle connection is kept for the next call to its host.
    pub idle_timeout: Duration,
    /// Idle connections kept per host: as many as calls can be in flight.
    pub idle_per_host: usize,
}

/// The least time between two replacements of the client.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

pub struct Outbound {
    settings: OutboundSettings,
    current: Mutex<(reqwest::Client, Instant)>,
}

impl Outbound {
    pub fn new(settings: OutboundSettings) -> Result<Arc<Self>, reqwest::Error> {
        let client = build(&settings)?;
        Ok(Arc::new(Outbound {
            settings,
            current: Mutex::new((client, Instant::now())),
        }))
    }

    /// The client for the next request.
    pub fn client(&self) -> reqwest::Client {
        self.current.lock().expect("not poisoned").0.clone()
    }

    /// Every descriptor is in use: replaces the client, so that its idle sockets close once
    /// the calls that use it end (at most once a second, however many calls ask).
    pub fn out_of_descriptors(&self) {
        let mut current = self.current.lock().expect("not poisoned");
        if current.1.elapsed() < REPLACE_AT_MOST_EVERY {
            return;
        }
        match build(&self.settings) {
            Ok(client) => {
                tracing::warn!("out of file descriptors: dropping the idle outgoing connections");
                *current = (client, Instant::now());
            }
            Err(e) => tracing::error!(error = %e, "cannot build a new HTTP client"),
        }
    }
}

fn build(settings: &OutboundSettings) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(&settings.egress)
        .pool_idle_timeout(settings.idle_timeout)
        // As many idle connections per host as calls can be in flight: a claim starts many
        // calls to one host at once, and each should find a connection rather than open one
        // (with 64, the benchmark's W2, 1,000 concurrent calls to one host, took 0.94 s
        // instead of 0.86 s).
        // Idle ones still go after the idle timeout, and at once when descriptors run out.
        .pool_max_idle_per_host(settings.idle_per_host)
        .tcp_nodelay(true)
        .build()
}

/// The settings every outbound client shares: no redirects, and the address guard in its
/// resolver (so the connection goes to the address that was checked).
pub fn client_builder(egress: &Arc<EgressPolicy>) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the target's name itself, out of the guard's sight.
        .no_proxy()
        .user_agent(concat!("doparallel/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(crate::egress::GuardedResolver::new(
            egress.clone(),
        )))
}

/// Whether an error comes from this process having no file descriptor left (EMFILE) or the
/// system none (ENFILE).
pub fn out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
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

/// An error with its chain of sources, which carries the useful part ("connection
/// refused", "reset by peer").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
