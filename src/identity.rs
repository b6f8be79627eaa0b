//! Who is calling, as plain data: the caller's identity (what WhoIs said
//! about the peer, resolved at the edge by the server) and the ownership
//! rule for jobs. Nothing here touches the tailnet, so every other module,
//! and the router's unit tests, can use it with a constructed identity.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

/// The identity of a tailnet peer, from WhoIs on its tailnet address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
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

/// Who owns a job: decides who may read or cancel it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Owner {
    /// A user-owned node: every node of the same user login is the owner.
    User(String),
    /// A tagged node (no user): only the same node is the owner.
    Node(String),
}

impl Identity {
    /// Whether the peer holds app capability `cap` toward this node.
    pub fn has_cap(&self, cap: &str) -> bool {
        self.caps.contains_key(cap)
    }

    /// The owner a job started by this caller is recorded under.
    pub fn owner(&self) -> Owner {
        if self.user_login.is_empty() {
            Owner::Node(self.node_id.clone())
        } else {
            Owner::User(self.user_login.clone())
        }
    }

    /// Whether this caller may see or cancel a job owned by `owner`: the same
    /// user login for user-owned nodes, the same node for tagged ones.
    pub fn owns(&self, owner: &Owner) -> bool {
        *owner == self.owner()
    }

    /// The first label of the node name (`laptop` for `laptop.tailnet.ts.net`).
    pub fn short_name(&self) -> &str {
        self.node_name.split('.').next().unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice_laptop() -> Identity {
        Identity {
            node_name: "laptop.tail1234.ts.net".into(),
            node_id: "nStable3".into(),
            ips: vec!["100.64.0.3".parse().unwrap()],
            user_login: "alice@example.com".into(),
            tags: vec![],
            caps: [("example.com/cap/x".to_string(), vec![])].into(),
        }
    }

    fn ci() -> Identity {
        Identity {
            node_name: "ci.tail1234.ts.net".into(),
            node_id: "nTag".into(),
            tags: vec!["tag:ci".into()],
            ..Identity::default()
        }
    }

    #[test]
    fn names_and_caps() {
        let alice = alice_laptop();
        assert_eq!(alice.short_name(), "laptop");
        assert!(alice.has_cap("example.com/cap/x"));
        assert!(!alice.has_cap("example.com/cap/z"));
        assert_eq!(alice.owner(), Owner::User("alice@example.com".into()));
        assert_eq!(ci().owner(), Owner::Node("nTag".into()));
    }

    #[test]
    fn ownership_is_per_user_or_per_tagged_node() {
        let alice_laptop = alice_laptop();
        let alice_phone = Identity {
            node_id: "nPhone".into(),
            ..alice_laptop.clone()
        };
        let bob = Identity {
            user_login: "bob@example.com".into(),
            ..alice_laptop.clone()
        };
        let ci = ci();
        let other_ci = Identity {
            node_id: "nTag2".into(),
            ..ci.clone()
        };
        assert!(alice_phone.owns(&alice_laptop.owner()));
        assert!(!bob.owns(&alice_laptop.owner()));
        assert!(ci.owns(&ci.owner()));
        assert!(!other_ci.owns(&ci.owner()));
        assert!(!ci.owns(&alice_laptop.owner()));
    }
}
