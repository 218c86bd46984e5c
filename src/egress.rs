//! The outbound address guard: which addresses task calls and callbacks may reach.
//!
//! DoParallel calls URLs its clients choose. Left open, it would relay requests into the
//! network it runs in (cloud metadata at 169.254.169.254, databases on private addresses).
//! So `serve` denies every special-purpose range by default, and checks:
//! - at submission, URLs whose host is an IP literal (the `url` crate has already
//!   normalised every spelling: `2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`, `[::1]`);
//! - at call time, every address a name resolves to, inside the HTTP client's resolver
//!   ([`GuardedResolver`]), so the connection goes to an address that was checked: there is no
//!   second lookup for DNS rebinding to slip through.
//!
//! Redirects are never followed, so a checked URL cannot hand the call on to another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Which outbound addresses are allowed.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    /// Deny the special-purpose ranges (see [`denied_range`]) unless `allow` covers them.
    deny_private: bool,
    allow: Vec<IpNet>,
}

impl EgressPolicy {
    /// The guard `serve` runs with: special-purpose ranges denied except `allow`.
    pub fn guarded(allow: Vec<IpNet>) -> Self {
        EgressPolicy {
            deny_private: true,
            allow,
        }
    }

    /// No guard at all (`doparallel run` without `--deny-private`).
    pub fn open() -> Self {
        EgressPolicy {
            deny_private: false,
            allow: Vec::new(),
        }
    }

    /// Why `ip` may not be reached, or `None` when it may.
    pub fn denies(&self, ip: IpAddr) -> Option<&'static str> {
        if !self.deny_private || self.allow.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        denied_range(ip)
    }

    /// Checks a URL whose host is an IP literal; a name is checked when it is resolved.
    pub fn check_url(&self, url: &Url) -> Result<(), String> {
        let ip = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        match self.denies(ip) {
            None => Ok(()),
            Some(why) => Err(format!(
                "host {ip} is a denied address ({why}); a server operator can allow its range \
                 with --allow-net"
            )),
        }
    }
}

/// The special-purpose range `ip` falls in, if any. IPv4 addresses embedded in IPv6 (mapped,
/// compatible, NAT64, 6to4) are judged as the IPv4 address they carry.
pub fn denied_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => denied_v4(v4),
        IpAddr::V6(v6) => denied_v6(v6),
    }
}

fn denied_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RANGES: &[(&str, &str)] = &[
        ("0.0.0.0/8", "this network"),
        // Azure's platform address (metadata, DNS, DHCP, health probes), public in form.
        ("168.63.129.16/32", "cloud platform metadata"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("255.255.255.255/32", "broadcast"),
    ];
    RANGES.iter().find_map(|(net, why)| {
        let net: Ipv4Net = net.parse().expect("a valid range");
        net.contains(&ip).then_some(*why)
    })
}

fn denied_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        // A public IPv4 address in mapped or NAT64 form is as reachable as itself.
        return denied_v4(v4);
    }
    const RANGES: &[(&str, &str)] = &[
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ];
    RANGES.iter().find_map(|(net, why)| {
        let net: Ipv6Net = net.parse().expect("a valid range");
        net.contains(&ip).then_some(*why)
    })
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-translated
/// (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) or 6to4
/// (`2002:AABB:CCDD::`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    // `::` and `::1` are their own thing, not IPv4-compatible addresses.
    if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
        return Some(tail());
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail());
    }
    // IPv4-translated (SIIT, `::ffff:0:a.b.c.d`).
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(tail());
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The error a resolver gives for a name whose addresses are denied. Found again in the
/// HTTP client's error chain to give the task the error kind `blocked`.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} resolves to {ip}, a denied address ({why}); a server operator can allow its range with --allow-net"
)]
pub struct Blocked {
    name: String,
    ip: IpAddr,
    why: &'static str,
}

/// Whether an error, or any error it was caused by, is a [`Blocked`].
pub fn is_blocked(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<Blocked>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The HTTP clients' resolver: the system's lookup, then the policy on every address. A name
/// with any denied address is refused whole rather than trimmed: a name that mixes public
/// and private addresses is not one to trust.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    policy: Arc<EgressPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<EgressPolicy>) -> Self {
        GuardedResolver { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            // The port is chosen by the client afterwards; 0 is a placeholder.
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some((ip, why)) = addrs
                .iter()
                .find_map(|a| policy.denies(a.ip()).map(|why| (a.ip(), why)))
            {
                return Err(Box::new(Blocked {
                    name: host,
                    ip,
                    why,
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url_verdict(policy: &EgressPolicy, text: &str) -> Result<(), String> {
        let url = Url::parse(text).map_err(|e| e.to_string())?;
        policy.check_url(&url)
    }

    #[test]
    fn every_spelling_of_a_denied_literal_is_refused() {
        let guard = EgressPolicy::guarded(Vec::new());
        let hostile = [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.0x0.0x0.0x1/",
            "http://0177.0.0.1/",
            "http://017700000001/",
            "http://127.1/",
            "http://127.0.1/",
            "http://127.000.000.001/",
            "http://[::1]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::ffff:0:7f00:1]/",
            "http://[::ffff:0:a9fe:a9fe]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::]/",
            "http://[2002:a9fe:a9fe::1]/",
            "http://0.0.0.0/",
            "http://0/",
            "http://[::]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://168.63.129.16/metadata/instance",
            "http://[::ffff:168.63.129.16]/",
            "http://2852039166/",
            "http://[::ffff:169.254.169.254]/",
            "http://10.0.0.1/",
            "http://10.255.255.255:8080/",
            "http://172.16.0.1/",
            "http://172.31.255.254/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://100.127.255.255/",
            "http://192.0.0.8/",
            "http://192.0.2.1/",
            "http://198.18.0.1/",
            "http://198.19.255.255/",
            "http://198.51.100.7/",
            "http://203.0.113.9/",
            "http://224.0.0.1/",
            "http://239.255.255.250/",
            "http://240.0.0.1/",
            "http://255.255.255.255/",
            "http://[fc00::1]/",
            "http://[fd12:3456::1]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
            "http://[2001:db8::1]/",
            "https://[fe80::a:b]:8443/x",
        ];
        for url in hostile {
            assert!(url_verdict(&guard, url).is_err(), "{url} was allowed");
        }
    }

    #[test]
    fn public_addresses_and_names_pass() {
        let guard = EgressPolicy::guarded(Vec::new());
        for url in [
            "http://93.184.215.14/",
            "http://[2606:4700::1111]/",
            "http://[::ffff:93.184.215.14]/",
            "http://[64:ff9b::93.184.215.14]/",
            "https://example.com/x",
            "http://localhost/",
        ] {
            // Names are judged when resolved, not here.
            assert_eq!(url_verdict(&guard, url), Ok(()), "{url}");
        }
    }

    #[test]
    fn allowed_ranges_and_the_open_policy() {
        let guard = EgressPolicy::guarded(vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(url_verdict(&guard, "http://127.0.0.1:8080/"), Ok(()));
        assert_eq!(url_verdict(&guard, "http://2130706433/"), Ok(()));
        assert!(
            url_verdict(&guard, "http://[::1]/").is_err(),
            "only the IPv4 range was allowed"
        );
        assert!(url_verdict(&guard, "http://10.1.2.3/").is_err());
        let open = EgressPolicy::open();
        assert_eq!(url_verdict(&open, "http://10.1.2.3/"), Ok(()));
    }

    #[test]
    fn the_reason_is_named() {
        let guard = EgressPolicy::guarded(Vec::new());
        let e = url_verdict(&guard, "http://169.254.169.254/").unwrap_err();
        assert!(
            e.contains("169.254.169.254 is a denied address (link-local)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_denied_addresses() {
        let resolver = GuardedResolver::new(Arc::new(EgressPolicy::guarded(Vec::new())));
        let Err(e) = resolver.resolve("localhost".parse().unwrap()).await else {
            panic!("localhost was allowed");
        };
        assert!(is_blocked(e.as_ref()), "{e}");
        assert!(e.to_string().contains("localhost resolves to"), "{e}");
        let allowing = GuardedResolver::new(Arc::new(EgressPolicy::guarded(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ])));
        assert!(allowing.resolve("localhost".parse().unwrap()).await.is_ok());
    }
}
