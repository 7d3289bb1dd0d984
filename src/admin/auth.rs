//! Who may call the admin API. The caller's uid, gid and pid come from the socket
//! (SO_PEERCRED); supplementary groups from `/proc/<pid>/status`. Root may do everything;
//! members of the admin group may change streams; members of the reader group may read.

use crate::audit;
use std::collections::BTreeSet;
use tonic::{Code, Request, Status};

/// The groups that widen access beyond root (gids, resolved from names at start).
#[derive(Debug, Clone, Default)]
pub struct AdminAccess {
    pub admin_gid: Option<u32>,
    pub reader_gid: Option<u32>,
}

/// A caller of the admin API.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub groups: BTreeSet<u32>,
}

/// What a call does: reads may be allowed more widely than writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

fn supplementary_groups(pid: i32) -> BTreeSet<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

impl AdminAccess {
    /// The caller of `req`, if it may make a call of `kind` (named `action` in messages).
    pub fn check<T>(&self, req: &Request<T>, kind: Kind, action: &str) -> Result<Caller, Status> {
        let cred = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred);
        let Some(cred) = cred else {
            return Err(audit::status(
                Code::PermissionDenied,
                "the caller's credentials are unknown (admin calls are accepted on the admin unix socket only)",
            ));
        };
        let mut groups = cred.pid().map(supplementary_groups).unwrap_or_default();
        groups.insert(cred.gid());
        let caller = Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        };
        let member = |gid: Option<u32>| gid.is_some_and(|g| caller.groups.contains(&g));
        let allowed = caller.uid == 0
            || member(self.admin_gid)
            || (kind == Kind::Read && member(self.reader_gid));
        if allowed {
            return Ok(caller);
        }
        crate::metrics::metrics()
            .admin_denials
            .get_or_create(&crate::metrics::AdminLabels {
                action: action.to_string(),
            })
            .inc();
        tracing::warn!(
            target: "imagestream::audit",
            action,
            uid = caller.uid,
            gid = caller.gid,
            pid = caller.pid,
            outcome = "denied",
            "admin call refused"
        );
        let who = match kind {
            Kind::Write => "root or members of the admin group (config admin_group)",
            Kind::Read => {
                "root or members of the admin or reader group (config admin_group, reader_group)"
            }
        };
        Err(audit::status(
            Code::PermissionDenied,
            format!("{action}: uid {} may not do this; only {who}", caller.uid),
        ))
    }
}

/// Logs a mutation: who, what, before and after.
pub fn record(caller: &Caller, action: &str, target: &str, before: &str, after: &str) {
    tracing::info!(
        target: "imagestream::audit",
        action,
        uid = caller.uid,
        pid = caller.pid,
        object = target,
        before,
        after,
        "admin change"
    );
}

/// Resolves a group given by name (from /etc/group) or number.
pub fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to resolve group {group:?}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == group)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("no group {group:?} in /etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_and_number() {
        assert_eq!(resolve_group("0"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
    }
}
