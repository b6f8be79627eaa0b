//! Which nodes a call goes to: TARGETs resolved in the peer list (host
//! name, MagicDNS name or tailnet IP), or every online peer with a host
//! name prefix or a tag.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use super::cli::Selection;
use crate::localapi::{Peer, Status};

/// One node to call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its name in output and summaries: the peer's short MagicDNS name.
    pub name: String,
    /// The address dialed: its first IPv4 address, else its first one.
    pub addr: SocketAddr,
    /// The `Host` header: its MagicDNS name (the daemon accepts it), with
    /// the port when not 80.
    pub host: String,
}

impl Target {
    fn of(peer: &Peer, ip: IpAddr, port: u16) -> Target {
        let name = peer.short_name();
        let base = if peer.dns_name.is_empty() {
            match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            }
        } else {
            peer.dns_name.clone()
        };
        Target {
            name: if name.is_empty() {
                ip.to_string()
            } else {
                name.to_string()
            },
            addr: SocketAddr::new(ip, port),
            host: if port == 80 {
                base
            } else {
                format!("{base}:{port}")
            },
        }
    }
}

/// A TARGET that names no peer: the call goes on for the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The TARGET as given.
    pub name: String,
    /// Why.
    pub error: String,
}

/// What a selection found.
#[derive(Debug, Default)]
pub struct Selected {
    /// The nodes to call, each peer once, in the order given (TARGETs) or
    /// by MagicDNS name.
    pub nodes: Vec<Result<Target, Unresolved>>,
    /// Peers that matched a prefix or tag but are offline (not called).
    pub offline: Vec<String>,
}

/// Resolves `selection` in `status` for the daemons' `port`.
pub fn select(status: &Status, selection: &Selection, port: u16) -> Selected {
    let mut out = Selected::default();
    let mut seen = HashSet::new();
    let mut add = |out: &mut Selected, peer: &Peer| {
        if !seen.insert(peer.id.clone()) {
            return;
        }
        match peer.addr() {
            Some(ip) => out.nodes.push(Ok(Target::of(peer, ip, port))),
            None => out.nodes.push(Err(Unresolved {
                name: peer.short_name().to_string(),
                error: "the peer has no tailnet address".into(),
            })),
        }
    };
    match selection {
        Selection::Targets(names) => {
            for name in names {
                match status.resolve(name) {
                    Ok(peer) => add(&mut out, peer),
                    Err(e) => out.nodes.push(Err(Unresolved {
                        name: name.clone(),
                        error: e.to_string(),
                    })),
                }
            }
        }
        Selection::Prefix(prefix) => {
            for peer in status
                .peers
                .iter()
                .filter(|p| p.host_name.starts_with(prefix.as_str()))
            {
                if peer.online {
                    add(&mut out, peer);
                } else {
                    out.offline.push(peer.short_name().to_string());
                }
            }
        }
        Selection::Tag(tag) => {
            for peer in status.peers.iter().filter(|p| p.has_tag(tag)) {
                if peer.online {
                    add(&mut out, peer);
                } else {
                    out.offline.push(peer.short_name().to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, host: &str, dns: &str, ips: &[&str], tags: &[&str], online: bool) -> Peer {
        Peer {
            id: id.into(),
            host_name: host.into(),
            dns_name: dns.into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            online,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            os: "linux".into(),
            user_login: None,
        }
    }

    fn status() -> Status {
        Status {
            backend_state: "Running".into(),
            version: String::new(),
            tun: false,
            magic_dns_suffix: "ts.net".into(),
            self_node: peer("me", "me", "me.ts.net", &["100.64.0.1"], &[], true),
            peers: vec![
                peer(
                    "a",
                    "tailkitd-a",
                    "tailkitd-a.ts.net",
                    &["fd7a::2", "100.64.0.2"],
                    &["tag:web"],
                    true,
                ),
                peer(
                    "b",
                    "tailkitd-b",
                    "tailkitd-b.ts.net",
                    &["100.64.0.3"],
                    &[],
                    false,
                ),
                peer("c", "tailkitd-c", "", &["fd7a::4"], &["tag:web"], true),
                peer("d", "db", "db.ts.net", &["100.64.0.5"], &["tag:web"], true),
            ],
            health: vec![],
        }
    }

    fn names(sel: &Selected) -> Vec<String> {
        sel.nodes
            .iter()
            .map(|n| match n {
                Ok(t) => t.name.clone(),
                Err(u) => format!("!{}", u.name),
            })
            .collect()
    }

    #[test]
    fn targets_resolve_once_each_and_unknown_ones_are_kept_as_errors() {
        let st = status();
        let sel = select(
            &st,
            &Selection::Targets(vec![
                "db".into(),
                "100.64.0.2".into(),
                "nope".into(),
                "tailkitd-a.ts.net".into(),
            ]),
            80,
        );
        assert_eq!(names(&sel), ["db", "tailkitd-a", "!nope"]);
        let a = sel.nodes[1].as_ref().unwrap();
        assert_eq!(a.addr, "100.64.0.2:80".parse().unwrap());
        assert_eq!(a.host, "tailkitd-a.ts.net");
        // An offline TARGET is still tried: the dial will say what is wrong.
        let sel = select(&st, &Selection::Targets(vec!["tailkitd-b".into()]), 8080);
        assert_eq!(
            sel.nodes[0].as_ref().unwrap().host,
            "tailkitd-b.ts.net:8080"
        );
    }

    #[test]
    fn prefix_and_tag_take_online_peers_and_list_offline_ones() {
        let st = status();
        let sel = select(&st, &Selection::Prefix("tailkitd-".into()), 80);
        assert_eq!(names(&sel), ["tailkitd-a", "tailkitd-c"]);
        assert_eq!(sel.offline, ["tailkitd-b"]);
        let c = sel.nodes[1].as_ref().unwrap();
        assert_eq!(c.host, "[fd7a::4]");
        assert_eq!(c.addr, "[fd7a::4]:80".parse().unwrap());
        let sel = select(&st, &Selection::Tag("web".into()), 80);
        assert_eq!(names(&sel), ["tailkitd-a", "tailkitd-c", "db"]);
        assert!(
            select(&st, &Selection::Prefix("x".into()), 80)
                .nodes
                .is_empty()
        );
    }
}
