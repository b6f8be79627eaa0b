//! Who a command runs as: the `user`/`group` of a tool file, or the
//! daemon's `command_user`, resolved once (at load, at start) against the
//! user and group databases into ids.
//!
//! A user is a name or a number; a number without a passwd entry is
//! accepted (containers often run such ids) but then needs a group. The
//! group is the user's primary group unless given. Supplementary groups
//! are the user's groups in the group database (as `su`, `runuser` and
//! systemd's `User=` give them), none for a user without a passwd entry.

use nix::unistd::{Gid, Group, Uid, User};
use tailkitd_launch::Credentials;

/// A resolved user to run commands as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As written (`user` or `user:group`), for messages.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary group ids, sorted.
    pub groups: Vec<u32>,
}

impl RunAs {
    /// The credentials the supervisor takes on for a command.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// Whether this process already runs exactly as this user (switching
    /// is then a no-op and needs no capability).
    pub fn is_current(&self) -> bool {
        let ids = Uid::current().as_raw() == self.uid
            && Uid::effective().as_raw() == self.uid
            && Gid::current().as_raw() == self.gid
            && Gid::effective().as_raw() == self.gid;
        ids && current_groups().is_some_and(|g| g == self.groups)
    }
}

fn current_groups() -> Option<Vec<u32>> {
    let mut groups: Vec<u32> = nix::unistd::getgroups()
        .ok()?
        .iter()
        .map(|g| g.as_raw())
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Some(groups)
}

/// Resolves `user` (a name or a number) and `group` (idem; default: the
/// user's primary group).
///
/// # Errors
///
/// When the user or group does not exist, or a numeric user without a
/// passwd entry comes without a group.
pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, String> {
    let entry = match User::from_name(user) {
        Ok(Some(entry)) => Some(entry),
        Ok(None) | Err(_) => match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
            Err(_) => return Err(format!("no user named {user:?}")),
        },
    };
    let uid = match (&entry, user.parse::<u32>()) {
        (Some(e), _) => e.uid.as_raw(),
        (None, Ok(uid)) => uid,
        (None, Err(_)) => return Err(format!("no user named {user:?}")),
    };
    let gid = match (group, &entry) {
        (Some(g), _) => resolve_group(g)?,
        (None, Some(e)) => e.gid.as_raw(),
        (None, None) => {
            return Err(format!(
                "user {uid} has no passwd entry, so it has no primary group: give a group too"
            ));
        }
    };
    let mut groups = match &entry {
        Some(e) => {
            let name = std::ffi::CString::new(e.name.as_str()).map_err(|e| e.to_string())?;
            nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                .map_err(|err| format!("the groups of user {:?}: {err}", e.name))?
                .iter()
                .map(|g| g.as_raw())
                .collect()
        }
        None => vec![gid],
    };
    groups.sort_unstable();
    groups.dedup();
    let name = match group {
        Some(g) => format!("{user}:{g}"),
        None => user.to_string(),
    };
    Ok(RunAs {
        name,
        uid,
        gid,
        groups,
    })
}

fn resolve_group(group: &str) -> Result<u32, String> {
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => group
            .parse::<u32>()
            .map_err(|_| format!("no group named {group:?}")),
    }
}

/// Parses and resolves `USER[:GROUP]` (the `command_user` setting).
///
/// # Errors
///
/// As [`resolve`], or an empty user.
pub fn parse_user_spec(text: &str) -> Result<RunAs, String> {
    let (user, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (text, None),
    };
    if user.is_empty() {
        return Err("the user must not be empty".into());
    }
    resolve(user, group)
}

/// Whether this process can run commands as `run_as`: it needs
/// `CAP_SETUID` and `CAP_KILL` (to signal the commands) for another user,
/// `CAP_SETGID` for other groups, in its effective set.
///
/// # Errors
///
/// Names the capabilities it lacks.
pub fn check_switch(run_as: &RunAs) -> Result<(), String> {
    use rustix::thread::CapabilitySet;
    if run_as.is_current() {
        return Ok(());
    }
    let other_user =
        Uid::current().as_raw() != run_as.uid || Uid::effective().as_raw() != run_as.uid;
    let other_groups = Gid::current().as_raw() != run_as.gid
        || Gid::effective().as_raw() != run_as.gid
        || current_groups().is_none_or(|g| g != run_as.groups);
    let effective = rustix::thread::capabilities(None)
        .map(|sets| sets.effective)
        .unwrap_or(CapabilitySet::empty());
    let mut missing = Vec::new();
    for (needed, cap, name) in [
        (other_user, CapabilitySet::SETUID, "CAP_SETUID"),
        (other_user, CapabilitySet::KILL, "CAP_KILL"),
        (other_groups, CapabilitySet::SETGID, "CAP_SETGID"),
    ] {
        if needed && !effective.contains(cap) {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the daemon cannot run commands as {} (uid {}, gid {}): it lacks {} (run it as root, or give it those capabilities)",
            run_as.name,
            run_as.uid,
            run_as.gid,
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_name_or_number() {
        let root = resolve("root", None).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        assert_eq!(resolve("0", None).unwrap().uid, 0);
        let odd = resolve("4242424", Some("4242425")).unwrap();
        assert_eq!(
            (odd.uid, odd.gid, odd.groups.clone()),
            (4242424, 4242425, vec![4242425])
        );
        assert!(
            resolve("4242424", None)
                .unwrap_err()
                .contains("give a group")
        );
        assert!(
            resolve("no-such-user-tk", None)
                .unwrap_err()
                .contains("no user")
        );
        assert!(
            resolve("root", Some("no-such-group-tk"))
                .unwrap_err()
                .contains("no group")
        );
        assert_eq!(parse_user_spec("0:0").unwrap().name, "0:0");
        assert!(parse_user_spec(":0").is_err());
    }

    #[test]
    fn switching_to_oneself_needs_nothing() {
        let me = RunAs {
            name: "me".into(),
            uid: Uid::current().as_raw(),
            gid: Gid::current().as_raw(),
            groups: current_groups().unwrap(),
        };
        assert!(me.is_current());
        assert_eq!(check_switch(&me), Ok(()));
    }
}
