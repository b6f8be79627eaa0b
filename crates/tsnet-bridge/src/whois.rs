//! Who is calling: the WhoIs result for a peer, reduced to what an
//! application decides on (node, user, tags, app capabilities). Plain data
//! parsed from the bridge's JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A tailnet peer as WhoIs on its tailnet address names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WhoIs {
    /// The peer's MagicDNS name without the trailing dot
    /// (`laptop.tailnet.ts.net`), or its host name when it has no FQDN.
    pub node_name: String,
    /// The node's stable id (`tailcfg.StableNodeID`).
    pub node_id: String,
    /// The node's tailnet addresses.
    pub ips: Vec<IpAddr>,
    /// Login of the owning user; empty for tagged nodes.
    pub user_login: String,
    /// ACL tags of the node (`tag:...`); empty for user-owned nodes.
    pub tags: Vec<String>,
    /// App capabilities the tailnet policy grants this peer toward us,
    /// capability name to the list of JSON values attached to it.
    pub caps: BTreeMap<String, Vec<serde_json::Value>>,
}

impl WhoIs {
    /// Parses the JSON of Go's `apitype.WhoIsResponse`
    /// (`{"Node": {...}, "UserProfile": {...}, "CapMap": {...}}`), as
    /// `tsnet.Server.LocalClient().WhoIs` returns it.
    ///
    /// # Errors
    ///
    /// When the JSON does not have that shape, names no node, or the node has
    /// no `StableID` (ownership of tagged nodes' jobs rests on it, and an
    /// empty id would be shared by every such caller: fail closed).
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Raw {
            node: Option<Node>,
            user_profile: Option<UserProfile>,
            #[serde(default)]
            cap_map: Option<BTreeMap<String, Option<Vec<serde_json::Value>>>>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Node {
            #[serde(default, rename = "StableID")]
            stable_id: String,
            #[serde(default)]
            name: String,
            #[serde(default)]
            hostinfo: Option<Hostinfo>,
            #[serde(default)]
            addresses: Option<Vec<String>>,
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        #[derive(Deserialize)]
        struct Hostinfo {
            #[serde(default, rename = "Hostname")]
            hostname: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct UserProfile {
            #[serde(default)]
            login_name: String,
        }

        let raw: Raw = serde_json::from_slice(json)?;
        let node = raw
            .node
            .ok_or_else(|| serde::de::Error::custom("WhoIs response has no Node"))?;
        if node.stable_id.is_empty() {
            return Err(serde::de::Error::custom(
                "WhoIs response has no Node.StableID",
            ));
        }
        let tags = node.tags.unwrap_or_default();
        let mut node_name = node.name.trim_end_matches('.').to_string();
        if node_name.is_empty() {
            node_name = node.hostinfo.map(|h| h.hostname).unwrap_or_default();
        }
        let ips = node
            .addresses
            .unwrap_or_default()
            .iter()
            .filter_map(|prefix| prefix.split('/').next()?.parse().ok())
            .collect();
        let user_login = if tags.is_empty() {
            raw.user_profile.map(|u| u.login_name).unwrap_or_default()
        } else {
            String::new()
        };
        let caps = raw
            .cap_map
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect();
        Ok(WhoIs {
            node_name,
            node_id: node.stable_id,
            ips,
            user_login,
            tags,
            caps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER_NODE: &str = r#"{
        "Node": {"ID": 3, "StableID": "nStable3", "Name": "laptop.tail1234.ts.net.",
                 "Addresses": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
                 "Hostinfo": {"Hostname": "laptop"}},
        "UserProfile": {"ID": 7, "LoginName": "alice@example.com", "DisplayName": "Alice"},
        "CapMap": {"example.com/cap/x": [{"any": true}], "example.com/cap/y": null}
    }"#;

    const TAGGED_NODE: &str = r#"{
        "Node": {"StableID": "nTag", "Name": "ci.tail1234.ts.net.", "Tags": ["tag:ci"],
                 "Addresses": ["100.64.0.9/32"]},
        "UserProfile": {"LoginName": "tagged-devices"}
    }"#;

    #[test]
    fn parses_a_user_owned_node() {
        let id = WhoIs::from_json(USER_NODE.as_bytes()).unwrap();
        assert_eq!(id.node_name, "laptop.tail1234.ts.net");
        assert_eq!(id.node_id, "nStable3");
        assert_eq!(id.user_login, "alice@example.com");
        assert_eq!(id.ips.len(), 2);
        assert_eq!(id.ips[0].to_string(), "100.64.0.3");
        assert!(id.caps.contains_key("example.com/cap/x"));
        assert!(id.caps.contains_key("example.com/cap/y"));
        assert!(!id.caps.contains_key("example.com/cap/z"));
    }

    #[test]
    fn tagged_nodes_have_no_user_and_own_by_node() {
        let id = WhoIs::from_json(TAGGED_NODE.as_bytes()).unwrap();
        assert_eq!(id.user_login, "");
        assert_eq!(id.tags, vec!["tag:ci".to_string()]);
        assert_eq!(id.node_id, "nTag");
        assert!(id.caps.is_empty());
    }

    #[test]
    fn a_response_without_node_is_an_error() {
        assert!(WhoIs::from_json(br#"{"UserProfile": {}}"#).is_err());
        assert!(WhoIs::from_json(b"not json").is_err());
    }

    #[test]
    fn a_node_without_a_stable_id_is_an_error() {
        // Applications key tagged nodes by their stable id; an empty one
        // would be shared by every such caller.
        for json in [
            r#"{"Node": {"Name": "ci.ts.net.", "Tags": ["tag:ci"]}}"#,
            r#"{"Node": {"StableID": "", "Name": "ci.ts.net.", "Tags": ["tag:ci"]}}"#,
            r#"{"Node": {"Name": "laptop.ts.net."}, "UserProfile": {"LoginName": "a@b.c"}}"#,
        ] {
            let err = WhoIs::from_json(json.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("Node.StableID"), "{json}: {err}");
        }
    }
}
