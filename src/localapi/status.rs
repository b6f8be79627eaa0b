//! [`Status`] and [`Peer`]: a node's view of the tailnet, parsed from
//! `ipnstate.Status` JSON, the document tailscaled's LocalAPI serves at
//! `/localapi/v0/status` and tsnet's own LocalClient returns (the bridge's
//! `Node::peers_json`), and how a target names a peer in it.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::LocalApiError;

/// tailscaled's state and its view of the tailnet (what `tailscale status
/// --json` shows, reduced to what finding and reaching peers needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// `NoState`, `NeedsLogin`, `NeedsMachineAuth`, `Stopped`, `Starting`
    /// or `Running`: only `Running` has a usable peer list.
    pub backend_state: String,
    /// tailscaled's version.
    pub version: String,
    /// Whether tailscaled uses a kernel TUN device (false: userspace
    /// networking).
    pub tun: bool,
    /// The tailnet's MagicDNS suffix, without dots around it (empty when not
    /// connected).
    pub magic_dns_suffix: String,
    /// This machine's node.
    pub self_node: Peer,
    /// Every peer in the network map, sorted by MagicDNS name.
    pub peers: Vec<Peer>,
    /// tailscaled's health warnings.
    pub health: Vec<String>,
}

/// One node of the tailnet as tailscaled sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The stable node ID.
    pub id: String,
    /// The host name the node reports (its OS or `--hostname` name; not
    /// necessarily unique, not necessarily the MagicDNS label).
    pub host_name: String,
    /// The MagicDNS name, without the trailing dot (e.g.
    /// `tk.example.ts.net`).
    pub dns_name: String,
    /// Its tailnet addresses.
    pub ips: Vec<IpAddr>,
    /// Whether it is connected to the control plane.
    pub online: bool,
    /// Its ACL tags (`tag:...`), empty for a user-owned node.
    pub tags: Vec<String>,
    /// Its operating system as it reports it (`linux`, ...).
    pub os: String,
    /// The login name of its owner (`tagged-devices` for tagged nodes),
    /// when tailscaled knows it.
    pub user_login: Option<String>,
}

impl Peer {
    /// The first label of the MagicDNS name (what `tailscale status` shows
    /// and MagicDNS resolves as a short name), or the host name when the
    /// peer has no DNS name.
    pub fn short_name(&self) -> &str {
        match self.dns_name.split('.').next() {
            Some(label) if !label.is_empty() => label,
            _ => &self.host_name,
        }
    }

    /// The address to dial it at: its first IPv4 address, else its first
    /// address.
    pub fn addr(&self) -> Option<IpAddr> {
        self.ips
            .iter()
            .find(|ip| ip.is_ipv4())
            .or(self.ips.first())
            .copied()
    }

    /// Whether it carries `tag` (`tag:` may be left out: `web` is
    /// `tag:web`).
    pub fn has_tag(&self, tag: &str) -> bool {
        let tag = tag.strip_prefix("tag:").unwrap_or(tag);
        self.tags
            .iter()
            .any(|t| t.strip_prefix("tag:").unwrap_or(t) == tag)
    }
}

impl Status {
    /// Parses the JSON of `GET /localapi/v0/status`.
    ///
    /// # Errors
    ///
    /// [`LocalApiError::Decode`] when it is not a status object.
    pub fn from_json(json: &[u8]) -> Result<Status, LocalApiError> {
        let raw: StatusRaw = serde_json::from_slice(json).map_err(|e| LocalApiError::Decode {
            op: "status",
            detail: e.to_string(),
        })?;
        let users = raw.user.unwrap_or_default();
        let peer = |p: PeerRaw| {
            let user_login = users
                .get(&p.user_id.to_string())
                .map(|u| u.login_name.clone())
                .filter(|l| !l.is_empty());
            Peer {
                id: p.id,
                host_name: p.host_name,
                dns_name: p.dns_name.trim_end_matches('.').to_string(),
                ips: p.tailscale_ips.unwrap_or_default(),
                online: p.online,
                tags: p.tags.unwrap_or_default(),
                os: p.os,
                user_login,
            }
        };
        let mut peers: Vec<Peer> = raw
            .peer
            .unwrap_or_default()
            .into_values()
            .map(peer)
            .collect();
        peers.sort_by(|a, b| a.dns_name.cmp(&b.dns_name).then(a.id.cmp(&b.id)));
        let magic_dns_suffix = raw
            .current_tailnet
            .map(|t| t.magic_dns_suffix)
            .filter(|s| !s.is_empty())
            .unwrap_or(raw.magic_dns_suffix);
        Ok(Status {
            backend_state: raw.backend_state,
            version: raw.version,
            tun: raw.tun,
            magic_dns_suffix,
            self_node: raw
                .self_node
                .map(peer)
                .unwrap_or_else(|| peer(PeerRaw::default())),
            peers,
            health: raw.health.unwrap_or_default(),
        })
    }

    /// Whether tailscaled is connected and its peer list current.
    pub fn is_running(&self) -> bool {
        self.backend_state == "Running"
    }

    /// The peer `target` names: a tailnet IP, a MagicDNS name (with or
    /// without the trailing dot), a MagicDNS short name, or a host name
    /// (case-insensitive). An exact MagicDNS name wins over a short name,
    /// which wins over a host name.
    ///
    /// # Errors
    ///
    /// [`LocalApiError::PeerNotFound`] when no peer matches;
    /// [`LocalApiError::AmbiguousPeer`] when several match at the same
    /// rank (two nodes reporting the same host name).
    pub fn resolve(&self, target: &str) -> Result<&Peer, LocalApiError> {
        if let Ok(ip) = target.parse::<IpAddr>() {
            return self
                .peers
                .iter()
                .find(|p| p.ips.contains(&ip))
                .ok_or_else(|| LocalApiError::PeerNotFound {
                    target: target.to_string(),
                });
        }
        let name = target.trim_end_matches('.');
        let ranks: [&dyn Fn(&Peer) -> bool; 3] = [
            &|p| !p.dns_name.is_empty() && p.dns_name.eq_ignore_ascii_case(name),
            &|p| !p.dns_name.is_empty() && p.short_name().eq_ignore_ascii_case(name),
            &|p| p.host_name.eq_ignore_ascii_case(name),
        ];
        for matches in ranks {
            let found: Vec<&Peer> = self.peers.iter().filter(|p| matches(p)).collect();
            match found.as_slice() {
                [] => continue,
                [one] => return Ok(one),
                many => {
                    return Err(LocalApiError::AmbiguousPeer {
                        target: target.to_string(),
                        candidates: many.iter().map(|p| p.dns_name.clone()).collect(),
                    });
                }
            }
        }
        Err(LocalApiError::PeerNotFound {
            target: target.to_string(),
        })
    }

    /// The online peers whose host name starts with `prefix` (`--prefix`;
    /// the Go SDK discovers daemons by the prefix `tailkitd-`).
    pub fn online_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Peer> {
        self.peers
            .iter()
            .filter(move |p| p.online && p.host_name.starts_with(prefix))
    }

    /// The online peers carrying `tag` (`--tag`; see [`Peer::has_tag`]).
    pub fn online_with_tag<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a Peer> {
        self.peers
            .iter()
            .filter(move |p| p.online && p.has_tag(tag))
    }
}

/// `ipnstate.Status` as tailscaled encodes it (Go field names; absent and
/// `null` fields tolerated).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StatusRaw {
    #[serde(default)]
    version: String,
    #[serde(default, rename = "TUN")]
    tun: bool,
    #[serde(default)]
    backend_state: String,
    #[serde(default, rename = "Self")]
    self_node: Option<PeerRaw>,
    #[serde(default)]
    health: Option<Vec<String>>,
    #[serde(default, rename = "MagicDNSSuffix")]
    magic_dns_suffix: String,
    #[serde(default)]
    current_tailnet: Option<TailnetRaw>,
    #[serde(default)]
    peer: Option<HashMap<String, PeerRaw>>,
    #[serde(default)]
    user: Option<HashMap<String, UserRaw>>,
}

#[derive(Deserialize)]
struct TailnetRaw {
    #[serde(default, rename = "MagicDNSSuffix")]
    magic_dns_suffix: String,
}

/// `ipnstate.PeerStatus`.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct PeerRaw {
    #[serde(default, rename = "ID")]
    id: String,
    #[serde(default)]
    host_name: String,
    #[serde(default, rename = "DNSName")]
    dns_name: String,
    #[serde(default, rename = "OS")]
    os: String,
    #[serde(default, rename = "UserID")]
    user_id: i64,
    #[serde(default, rename = "TailscaleIPs")]
    tailscale_ips: Option<Vec<IpAddr>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    online: bool,
}

/// `tailcfg.UserProfile`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserRaw {
    #[serde(default)]
    login_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from `tailscale status --json` of tailscaled v1.102.5.
    const STATUS: &str = r#"{
      "Version": "1.102.5-ERR-BuildInfo",
      "TUN": false,
      "BackendState": "Running",
      "HaveNodeKey": true,
      "AuthURL": "",
      "TailscaleIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"],
      "Self": {
        "ID": "nSelf", "PublicKey": "nodekey:aa", "HostName": "ops",
        "DNSName": "ops.localnet.ts.net.", "OS": "linux", "UserID": 2,
        "TailscaleIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"], "Online": true
      },
      "Health": null,
      "MagicDNSSuffix": "localnet.ts.net",
      "CurrentTailnet": {"Name": "localnet", "MagicDNSSuffix": "localnet.ts.net", "MagicDNSEnabled": true},
      "Peer": {
        "nodekey:bb": {
          "ID": "nTk", "HostName": "tk", "DNSName": "tk.localnet.ts.net.", "OS": "linux",
          "UserID": 3, "TailscaleIPs": ["fd7a:115c:a1e0::3", "100.64.0.3"], "Online": true
        },
        "nodekey:cc": {
          "ID": "nWeb1", "HostName": "tailkitd-web", "DNSName": "tailkitd-web.localnet.ts.net.",
          "OS": "linux", "UserID": 4, "TailscaleIPs": ["100.64.0.4"],
          "Tags": ["tag:web", "tag:prod"], "Online": true
        },
        "nodekey:dd": {
          "ID": "nWeb2", "HostName": "tailkitd-web", "DNSName": "tailkitd-web-1.localnet.ts.net.",
          "OS": "linux", "UserID": 4, "TailscaleIPs": ["100.64.0.5"],
          "Tags": ["tag:web"], "Online": false
        },
        "nodekey:ee": {
          "ID": "nLaptop", "HostName": "Alices-MacBook", "DNSName": "laptop.localnet.ts.net.",
          "OS": "macOS", "UserID": 2, "TailscaleIPs": null, "Online": true
        }
      },
      "User": {
        "2": {"ID": 2, "LoginName": "ops@localnet", "DisplayName": "ops"},
        "3": {"ID": 3, "LoginName": "tk@localnet", "DisplayName": "tk"},
        "4": {"ID": 4, "LoginName": "tagged-devices", "DisplayName": "tagged devices"}
      }
    }"#;

    fn status() -> Status {
        Status::from_json(STATUS.as_bytes()).unwrap()
    }

    #[test]
    fn parses_self_peers_and_users() {
        let st = status();
        assert!(st.is_running());
        assert!(!st.tun);
        assert_eq!(st.magic_dns_suffix, "localnet.ts.net");
        assert_eq!(st.self_node.dns_name, "ops.localnet.ts.net");
        assert_eq!(st.self_node.user_login.as_deref(), Some("ops@localnet"));
        let names: Vec<&str> = st.peers.iter().map(|p| p.dns_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "laptop.localnet.ts.net",
                "tailkitd-web-1.localnet.ts.net",
                "tailkitd-web.localnet.ts.net",
                "tk.localnet.ts.net"
            ]
        );
        let tk = &st.peers[3];
        assert_eq!(tk.user_login.as_deref(), Some("tk@localnet"));
        assert_eq!(tk.addr(), Some("100.64.0.3".parse().unwrap()));
        assert_eq!(st.peers[0].addr(), None);
        assert!(st.health.is_empty());
    }

    #[test]
    fn resolves_ips_dns_names_short_names_and_host_names() {
        let st = status();
        for target in [
            "tk",
            "TK",
            "tk.localnet.ts.net",
            "tk.localnet.ts.net.",
            "100.64.0.3",
            "fd7a:115c:a1e0::3",
        ] {
            assert_eq!(st.resolve(target).unwrap().id, "nTk", "{target}");
        }
        // The short name wins over a host name; the host name works too.
        assert_eq!(st.resolve("laptop").unwrap().id, "nLaptop");
        assert_eq!(st.resolve("alices-macbook").unwrap().id, "nLaptop");
        assert_eq!(st.resolve("tailkitd-web-1").unwrap().id, "nWeb2");
        // Two peers report host name tailkitd-web, but one owns the DNS label.
        assert_eq!(st.resolve("tailkitd-web").unwrap().id, "nWeb1");
    }

    #[test]
    fn unknown_and_ambiguous_targets_are_errors_that_say_so() {
        let mut st = status();
        let err = st.resolve("nope").unwrap_err();
        assert_eq!(err.to_string(), "peer nope not found in the peer list");
        assert!(matches!(
            st.resolve("100.64.0.2"),
            Err(LocalApiError::PeerNotFound { .. })
        ));
        st.peers[3].host_name = "Alices-MacBook".into();
        st.peers[0].dns_name = String::new();
        let err = st.resolve("alices-macbook").unwrap_err();
        assert!(err.to_string().contains("names several peers"), "{err}");
    }

    #[test]
    fn prefix_and_tag_select_online_peers() {
        let st = status();
        let ids =
            |it: &mut dyn Iterator<Item = &Peer>| it.map(|p| p.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&mut st.online_with_prefix("tailkitd-")), ["nWeb1"]);
        assert_eq!(ids(&mut st.online_with_tag("web")), ["nWeb1"]);
        assert_eq!(ids(&mut st.online_with_tag("tag:prod")), ["nWeb1"]);
        assert!(ids(&mut st.online_with_tag("db")).is_empty());
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err = Status::from_json(b"<html>").unwrap_err();
        assert!(
            matches!(err, LocalApiError::Decode { op: "status", .. }),
            "{err}"
        );
        let empty = Status::from_json(b"{}").unwrap();
        assert!(!empty.is_running());
        assert!(empty.peers.is_empty());
    }
}
