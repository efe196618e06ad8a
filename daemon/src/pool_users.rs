//! Who each app's pool runs as. As root, cairnd gives every app a user and group of its own
//! (the same number), taken from a configured range and recorded in the store, so an app keeps
//! it across restarts and reboots, as systemd's DynamicUser does. Such a user is in no group
//! (not the control group), so one pool cannot signal, trace or read another, nor use the
//! control socket (which also refuses every id of the range outright, `is_pool_uid`).
//! Without root there is nothing to switch to: pools run as cairnd's own user, and
//! `gaps` says what that gives up.

use crate::spec::AppName;
use crate::store::{Store, StoreError};
use std::ops::RangeInclusive;

/// Said in every mode where pools cannot install their system-call filter.
fn no_seccomp(why: &str) -> String {
    format!("pools run without a seccomp filter ({why}): a pool that escaped its sandbox could make any system call its user may, creating sockets included")
}

/// The default range of pool ids: 10,000 apps, above the 16-bit ids that systemd's dynamic
/// users and regular users take. Subordinate ranges that reach into it are skipped
/// (`taken_by_the_system`).
pub const DEFAULT_RANGE: RangeInclusive<u32> = 4_000_000..=4_009_999;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolUsers {
    /// cairnd is not root: every pool runs as cairnd's own user.
    Own,
    /// `pool_user` is set: every pool runs as that one user.
    Shared { name: String, uid: u32, gid: u32 },
    /// A user and group of its own per app, from this range.
    PerApp { range: RangeInclusive<u32> },
}

#[derive(Debug, thiserror::Error)]
pub enum PoolUsersError {
    #[error("pool_user `{0}` does not exist on this system; create it, or leave pool_user out to give each app a user of its own")]
    NoSuchUser(String),
    #[error("pool_user `{0}` is root; pools must run unprivileged")]
    Root(String),
    #[error("pool_ids = \"{0}\" is not a range: write FIRST-LAST, such as \"4000000-4009999\", with 1000 <= FIRST <= LAST")]
    BadRange(String),
    #[error("pool_ids {first}-{last} are not all mapped in the user namespace cairnd runs in ({file}: {map}), so no pool could switch to them; set pool_ids to a range inside the mapping")]
    Unmapped {
        first: u32,
        last: u32,
        file: &'static str,
        map: String,
    },
    #[error("no free id left in pool_ids {first}-{last} for app `{app}` (every id is an app's or the system's); widen the range")]
    Exhausted { app: String, first: u32, last: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PoolUsers {
    /// Resolves the config's `pool_user` and `pool_ids` for a daemon running as `root` (or not).
    pub fn resolve(
        root: bool,
        pool_user: Option<&str>,
        pool_ids: Option<&str>,
    ) -> Result<PoolUsers, PoolUsersError> {
        if !root {
            return Ok(PoolUsers::Own);
        }
        if let Some(name) = pool_user {
            let user = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| PoolUsersError::NoSuchUser(name.to_string()))?;
            if user.uid.is_root() {
                return Err(PoolUsersError::Root(name.to_string()));
            }
            return Ok(PoolUsers::Shared {
                name: user.name,
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            });
        }
        let range = match pool_ids {
            Some(text) => parse_range(text)?,
            None => DEFAULT_RANGE,
        };
        // Inside a user namespace (a container) only the mapped ids exist: a pool told to
        // switch to another would fail at every start.
        for file in ["/proc/self/uid_map", "/proc/self/gid_map"] {
            if let Ok(map) = std::fs::read_to_string(file) {
                if !mapped(&map, &range) {
                    return Err(PoolUsersError::Unmapped {
                        first: *range.start(),
                        last: *range.end(),
                        file,
                        map: map.split_whitespace().collect::<Vec<_>>().join(" "),
                    });
                }
            }
        }
        Ok(PoolUsers::PerApp { range })
    }

    /// One line for the log and `cairnctl status`.
    pub fn describe(&self) -> String {
        match self {
            PoolUsers::Own => "cairnd's own user (cairnd is not root, so it cannot switch)".into(),
            PoolUsers::Shared { name, uid, gid } => {
                format!("{name} (uid {uid}, gid {gid}) for every app, no supplementary groups, no_new_privs")
            }
            PoolUsers::PerApp { range } => format!(
                "a user and group of its own per app (ids {}-{}; see `cairnctl status APP`), no supplementary groups, no_new_privs",
                range.start(),
                range.end()
            ),
        }
    }

    /// What does not hold between pools, and between a pool and cairnd, under this setting.
    pub fn gaps(&self) -> Vec<String> {
        let mut gaps = self.user_gaps();
        gaps.extend(crate::pool::seccomp::unavailable().map(no_seccomp));
        gaps
    }

    fn user_gaps(&self) -> Vec<String> {
        match self {
            PoolUsers::Own => vec![
                "pools run as cairnd's own user: a pool that escaped its sandbox could use the control socket, signal cairnd and other pools, and read their memory".into(),
                "pools share one user: they are not kept from signalling or tracing each other".into(),
            ],
            PoolUsers::Shared { name, .. } => vec![format!(
                "every pool runs as `{name}` (pool_user): pools are not kept from signalling or tracing each other; leave pool_user out to give each app a user of its own"
            )],
            PoolUsers::PerApp { .. } => Vec::new(),
        }
    }

    /// Whether `uid` is one pools run as (then it may not use the control socket). Under
    /// `Own` no uid is told apart from cairnd's own: `gaps` says so.
    pub fn is_pool_uid(&self, uid: u32) -> bool {
        match self {
            PoolUsers::Own => false,
            PoolUsers::Shared { uid: pool, .. } => uid == *pool,
            PoolUsers::PerApp { range } => range.contains(&uid),
        }
    }

    /// Who `app`'s pool runs as, for `cairnctl status APP`, without giving it an id.
    /// Blocking (the store).
    pub fn describe_app(&self, store: &Store, app: &AppName) -> String {
        match self {
            PoolUsers::Own => "cairnd's own user".into(),
            PoolUsers::Shared { name, uid, gid } => format!("{name} (uid {uid}, gid {gid})"),
            PoolUsers::PerApp { .. } => match store.held_pool_id(app.as_str()) {
                Ok(Some(id)) => format!("uid {id}, gid {id} (its own)"),
                Ok(None) => "none yet (given at its first start)".into(),
                Err(error) => format!("unknown ({error})"),
            },
        }
    }

    /// The uid and gid `app`'s pool switches to (`None`: no switch), allocating the app's
    /// id on its first start. Blocking (the store).
    pub fn ids_for(
        &self,
        store: &Store,
        app: &AppName,
    ) -> Result<Option<(u32, u32)>, PoolUsersError> {
        match self {
            PoolUsers::Own => Ok(None),
            PoolUsers::Shared { uid, gid, .. } => Ok(Some((*uid, *gid))),
            PoolUsers::PerApp { range } => {
                let id = store
                    .pool_id(app.as_str(), range.clone(), taken_by_the_system)?
                    .ok_or_else(|| PoolUsersError::Exhausted {
                        app: app.as_str().to_string(),
                        first: *range.start(),
                        last: *range.end(),
                    })?;
                Ok(Some((id, id)))
            }
        }
    }
}

/// Whether the system names `id` (it is then not given to a pool): a user or group of its
/// database, or an id of a subordinate range (`/etc/subuid`, `/etc/subgid`) that rootless
/// containers map their users to.
fn taken_by_the_system(id: u32) -> bool {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id));
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id));
    matches!(user, Ok(Some(_)))
        || matches!(group, Ok(Some(_)))
        || ["/etc/subuid", "/etc/subgid"].iter().any(|file| {
            std::fs::read_to_string(file)
                .map(|text| subordinate_ranges(&text).any(|range| range.contains(&id)))
                .unwrap_or(false)
        })
}

/// The ranges of a subuid/subgid file: lines `owner:first:count`.
fn subordinate_ranges(text: &str) -> impl Iterator<Item = RangeInclusive<u32>> + '_ {
    text.lines().filter_map(|line| {
        let mut fields = line.trim().split(':').skip(1);
        let first: u32 = fields.next()?.parse().ok()?;
        let count: u32 = fields.next()?.parse().ok()?;
        Some(first..=first.checked_add(count.checked_sub(1)?)?)
    })
}

/// Whether one line of a uid_map or gid_map (`inside outside count`) holds all of `range`.
fn mapped(map: &str, range: &RangeInclusive<u32>) -> bool {
    map.lines().any(|line| {
        let fields: Vec<u64> = line
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        matches!(fields[..], [inside, _, count]
            if inside <= u64::from(*range.start()) && u64::from(*range.end()) < inside + count)
    })
}

fn parse_range(text: &str) -> Result<RangeInclusive<u32>, PoolUsersError> {
    let bad = || PoolUsersError::BadRange(text.to_string());
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let first: u32 = first.trim().parse().map_err(|_| bad())?;
    let last: u32 = last.trim().parse().map_err(|_| bad())?;
    // Below 1000 are the system's own users; u32::MAX is "no id" to the kernel.
    if first < 1000 || first > last || last == u32::MAX {
        return Err(bad());
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_must_lie_inside_one_line_of_the_namespace_map() {
        let initial = "         0          0 4294967295\n";
        assert!(mapped(initial, &DEFAULT_RANGE));
        let container = "0 100000 65536\n";
        assert!(!mapped(container, &DEFAULT_RANGE));
        assert!(mapped(container, &(60000..=65535)));
        assert!(!mapped(container, &(60000..=65536)));
        // Two lines that touch do not make one range.
        let split = "0 100000 5000\n5000 200000 5000\n";
        assert!(!mapped(split, &(4000..=6000)));
        assert!(mapped(split, &(5000..=9999)));
    }

    #[test]
    fn ranges_parse_and_bad_ones_say_how_to_write_them() {
        assert_eq!(parse_range("5000-5009").unwrap(), 5000..=5009);
        assert_eq!(parse_range(" 5000 - 5000 ").unwrap(), 5000..=5000);
        for bad in ["", "5000", "10-20", "6000-5000", "a-b", "5000-4294967295"] {
            let error = parse_range(bad).unwrap_err().to_string();
            assert!(error.contains("FIRST-LAST"), "{bad}: {error}");
        }
    }

    #[test]
    fn subordinate_ranges_are_read_from_subuid_lines() {
        let ranges: Vec<_> =
            subordinate_ranges("alice:100000:65536\n# comment\nbob:165536:65536\nbad:1\n")
                .collect();
        assert_eq!(ranges, vec![100000..=165535, 165536..=231071]);
    }

    #[test]
    fn only_root_switches_and_per_app_is_the_default() {
        assert_eq!(
            PoolUsers::resolve(false, Some("root"), None).unwrap(),
            PoolUsers::Own
        );
        assert_eq!(
            PoolUsers::resolve(true, None, None).unwrap(),
            PoolUsers::PerApp {
                range: DEFAULT_RANGE
            }
        );
        assert!(matches!(
            PoolUsers::resolve(true, Some("root"), None),
            Err(PoolUsersError::Root(_))
        ));
        assert!(matches!(
            PoolUsers::resolve(true, Some("no-such-user-here"), None),
            Err(PoolUsersError::NoSuchUser(_))
        ));
    }

    #[test]
    fn the_control_socket_tells_pool_ids_apart() {
        let per_app = PoolUsers::PerApp { range: 5000..=5009 };
        assert!(per_app.is_pool_uid(5000) && per_app.is_pool_uid(5009));
        assert!(!per_app.is_pool_uid(4999) && !per_app.is_pool_uid(0));
        let filter_gaps = usize::from(crate::pool::seccomp::unavailable().is_some());
        assert_eq!(per_app.gaps().len(), filter_gaps);
        assert!(!PoolUsers::Own.is_pool_uid(0));
        assert_eq!(PoolUsers::Own.gaps().len(), 2 + filter_gaps);
    }

    #[test]
    fn an_app_keeps_its_id_and_a_freed_id_is_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cairn.db")).unwrap();
        let users = PoolUsers::PerApp { range: 5000..=5002 };
        let name = |n: &str| n.parse::<AppName>().unwrap();
        let a = users.ids_for(&store, &name("a")).unwrap();
        let b = users.ids_for(&store, &name("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(users.ids_for(&store, &name("a")).unwrap(), a, "stable");
        users.ids_for(&store, &name("c")).unwrap();
        assert!(matches!(
            users.ids_for(&store, &name("d")),
            Err(PoolUsersError::Exhausted { .. })
        ));
        store.release_pool_id("b").unwrap();
        assert_eq!(users.ids_for(&store, &name("d")).unwrap(), b);
        // An id from a range the config no longer names is replaced by one from the new range.
        let moved = PoolUsers::PerApp { range: 6000..=6009 };
        assert_eq!(
            moved.ids_for(&store, &name("a")).unwrap(),
            Some((6000, 6000))
        );
        // Apps the store does not have (none of these was committed) lose their ids at start.
        assert_eq!(store.release_orphan_pool_ids().unwrap(), 3);
    }
}
