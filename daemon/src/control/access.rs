//! Who may call what: every call is authorised from the peer's credentials (`SO_PEERCRED`).
//! A pool's user may call nothing, whatever the socket's mode and groups. Root, the daemon's
//! own user and members of the control group may change state; with `read_access = "any"`
//! everyone else may read.

use crate::config::{Config, ReadAccess};
use crate::pool_users::PoolUsers;
use nix::unistd::{Gid, Group, Uid, User};
use std::ffi::CString;
use std::sync::Arc;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

/// What a caller that passed `Access::check` may do besides what it asked.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub may_change_state: bool,
    /// Root or cairnd's own user: who may deploy an app that reads the device's secrets
    /// (`device_secrets`), which a member of the control group may not read.
    pub owns_device: bool,
}

/// Who may change state and who may read.
pub struct Access {
    daemon_uid: Uid,
    group: Option<(String, Gid)>,
    read_access: ReadAccess,
    pool_users: Arc<PoolUsers>,
}

impl Access {
    pub fn from_config(config: &Config, pool_users: Arc<PoolUsers>) -> Access {
        let group = Group::from_name(&config.control.group)
            .ok()
            .flatten()
            .map(|group| (group.name, group.gid));
        Access {
            daemon_uid: Uid::effective(),
            group,
            read_access: config.control.read_access,
            pool_users,
        }
    }

    fn in_group(&self, uid: Uid, gid: Gid) -> bool {
        let Some((_, group_gid)) = &self.group else {
            return false;
        };
        if gid == *group_gid {
            return true;
        }
        // SO_PEERCRED carries the primary group only; supplementary groups come from the
        // user database.
        let Some(user) = User::from_uid(uid).ok().flatten() else {
            return false;
        };
        let Ok(name) = CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .map(|groups| groups.contains(group_gid))
            .unwrap_or(false)
    }

    pub fn check<T>(
        &self,
        request: &Request<T>,
        action: &str,
        changes_state: bool,
    ) -> Result<Caller, Status> {
        let credentials = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| {
                Status::permission_denied(
                    "the caller's credentials could not be read from the socket",
                )
            })?;
        let uid = Uid::from_raw(credentials.uid());
        let gid = Gid::from_raw(credentials.gid());
        if self.pool_users.is_pool_uid(uid.as_raw()) {
            return Err(Status::permission_denied(format!(
                "uid {uid} is an app pool's user: pools may not use the control socket"
            )));
        }
        let owns_device = uid.is_root() || uid == self.daemon_uid;
        if owns_device || self.in_group(uid, gid) {
            return Ok(Caller {
                may_change_state: true,
                owns_device,
            });
        }
        if !changes_state && self.read_access == ReadAccess::Any {
            return Ok(Caller {
                may_change_state: false,
                owns_device: false,
            });
        }
        let group_hint = match &self.group {
            Some((name, _)) => {
                format!("members of group `{name}` (add the user with `usermod -aG {name} USER`)")
            }
            None => "members of the control group (none is configured on this device)".to_string(),
        };
        Err(Status::permission_denied(format!(
            "uid {uid} may not {action}: only root, the daemon's user and {group_hint} may"
        )))
    }
}
