//! Fleet precedence, as a pure function: which key's spec an app name runs with when several
//! documents name it. The device key wins over group keys, and groups win in the order the
//! config lists them. A document may name an app a better key holds (it is shadowed, not
//! deployed); when the key that won an app lets it go, the next key that lists it takes over
//! with its own spec (kept in `sync_applied`, so no link is needed), and an app no key lists
//! any more is removed.

use crate::spec::AppSpec;
use crate::store::AppliedRecord;

/// What applying one key's document changes.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan {
    /// Apps to deploy, each with the key whose spec it is: the document's own, or a lower
    /// key's taking over an app the document let go.
    pub deploys: Vec<(String, AppSpec)>,
    /// Apps of the document that a better key holds, with that key. Their artifacts are
    /// still fetched, so a later handover works offline.
    pub shadowed: Vec<(AppSpec, String)>,
    /// Apps the document let go that no other applied key lists.
    pub removals: Vec<String>,
}

impl Plan {
    /// Every component the plan may need: the document's apps (shadowed ones too) and the
    /// handovers.
    pub fn artifacts(&self) -> impl Iterator<Item = &crate::digest::Digest> {
        self.deploys
            .iter()
            .map(|(_, spec)| &spec.component)
            .chain(self.shadowed.iter().map(|(spec, _)| &spec.component))
    }
}

/// The plan for applying `apps`, the document of `key`, to a device whose `targets` are its
/// keys in order of precedence (the device key first), given what is applied now.
pub(super) fn plan(
    targets: &[String],
    key: &str,
    apps: &[AppSpec],
    applied: &[AppliedRecord],
) -> Plan {
    let rank = |key: &str| targets.iter().position(|t| t == key).unwrap_or(usize::MAX);
    let mine = rank(key);
    let previous = applied.iter().find(|a| a.key == key);
    let others: Vec<&AppliedRecord> = applied
        .iter()
        .filter(|a| a.key != key && rank(&a.key) != usize::MAX)
        .collect();
    let winner_above = |name: &str| {
        others
            .iter()
            .filter(|o| rank(&o.key) < mine && o.apps.iter().any(|a| a == name))
            .min_by_key(|o| rank(&o.key))
            .map(|o| o.key.clone())
    };
    let mut plan = Plan::default();
    for app in apps {
        match winner_above(app.name.as_str()) {
            Some(by) => plan.shadowed.push((app.clone(), by)),
            None => plan.deploys.push((key.to_string(), app.clone())),
        }
    }
    let listed = |name: &str| apps.iter().any(|a| a.name.as_str() == name);
    for gone in previous.map(|p| p.apps.as_slice()).unwrap_or_default() {
        if listed(gone) || winner_above(gone).is_some() {
            continue;
        }
        let next = others
            .iter()
            .filter(|o| rank(&o.key) > mine)
            .filter_map(|o| {
                o.specs
                    .iter()
                    .find(|s| s.name.as_str() == gone)
                    .map(|s| (rank(&o.key), o.key.clone(), s.clone()))
            })
            .min_by_key(|(r, _, _)| *r);
        match next {
            Some((_, from, spec)) => plan.deploys.push((from, spec)),
            None => plan.removals.push(gone.clone()),
        }
    }
    plan
}

/// The plan for leaving `left`, a key the device no longer follows (a group taken out of the
/// config): each app it listed goes to the best key still followed that lists it, with that
/// key's spec (a no-op when that key held it already), or is removed when none does.
pub(super) fn leave(targets: &[String], left: &str, applied: &[AppliedRecord]) -> Plan {
    let rank = |key: &str| targets.iter().position(|t| t == key);
    let mut plan = Plan::default();
    let Some(record) = applied.iter().find(|a| a.key == left) else {
        return plan;
    };
    for gone in &record.apps {
        let next = applied
            .iter()
            .filter(|o| o.key != left)
            .filter_map(|o| {
                let spec = o.specs.iter().find(|s| s.name.as_str() == gone)?;
                Some((rank(&o.key)?, o.key.clone(), spec.clone()))
            })
            .min_by_key(|(r, _, _)| *r);
        match next {
            Some((_, from, spec)) => plan.deploys.push((from, spec)),
            None => plan.removals.push(gone.clone()),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, greeting: &str) -> AppSpec {
        let digest = crate::digest::Digest::of(greeting.as_bytes());
        AppSpec::from_manifest(&format!(
            "name = \"{name}\"\ncomponent = \"{digest}\"\n[http]\nlisten = \"127.0.0.1:8080\"\n"
        ))
        .unwrap()
    }

    /// An applied key: its apps, each `name` or `name=greeting` (the spec's component).
    fn applied(key: &str, apps: &[&str]) -> AppliedRecord {
        let specs: Vec<AppSpec> = apps
            .iter()
            .map(|app| {
                let (name, greeting) = app.split_once('=').unwrap_or((app, key));
                spec(name, greeting)
            })
            .collect();
        AppliedRecord {
            key: key.to_string(),
            version: 1,
            applied_unix: 0,
            apps: specs.iter().map(|s| s.name.to_string()).collect(),
            specs,
            expires_unix: 0,
            complete: true,
            value_sha256: String::new(),
        }
    }

    struct Case {
        name: &'static str,
        /// The key applied now and its document's apps.
        key: &'static str,
        apps: &'static [&'static str],
        /// What was applied before (this key's previous document too).
        before: &'static [(&'static str, &'static [&'static str])],
        /// (app, key whose spec it gets)
        deploys: &'static [(&'static str, &'static str)],
        /// (app, key that wins it)
        shadowed: &'static [(&'static str, &'static str)],
        removals: &'static [&'static str],
    }

    #[test]
    fn the_device_key_wins_then_groups_in_order_and_let_go_apps_pass_down() {
        let targets: Vec<String> = ["device.d", "group.a", "group.b"]
            .map(String::from)
            .to_vec();
        let cases = [
            Case {
                name: "a first document deploys its apps",
                key: "group.a",
                apps: &["web"],
                before: &[],
                deploys: &[("web", "group.a")],
                shadowed: &[],
                removals: &[],
            },
            Case {
                name: "the device key shadows a group's app",
                key: "group.a",
                apps: &["web", "api"],
                before: &[("device.d", &["web"])],
                deploys: &[("api", "group.a")],
                shadowed: &[("web", "device.d")],
                removals: &[],
            },
            Case {
                name: "an earlier group shadows a later one",
                key: "group.b",
                apps: &["web"],
                before: &[("group.a", &["web"])],
                deploys: &[],
                shadowed: &[("web", "group.a")],
                removals: &[],
            },
            Case {
                name: "a better key takes an app a worse key holds",
                key: "device.d",
                apps: &["web"],
                before: &[("group.b", &["web"])],
                deploys: &[("web", "device.d")],
                shadowed: &[],
                removals: &[],
            },
            Case {
                name: "an app let go by every key is removed",
                key: "group.a",
                apps: &[],
                before: &[("group.a", &["web"])],
                deploys: &[],
                shadowed: &[],
                removals: &["web"],
            },
            Case {
                name: "an app the winner lets go passes to the next key with its spec",
                key: "device.d",
                apps: &[],
                before: &[
                    ("device.d", &["web"]),
                    ("group.b", &["web=from-b"]),
                    ("group.a", &["web=from-a"]),
                ],
                deploys: &[("web", "group.a")],
                shadowed: &[],
                removals: &[],
            },
            Case {
                name: "a loser letting go changes nothing while a better key holds it",
                key: "group.b",
                apps: &[],
                before: &[("group.b", &["web"]), ("group.a", &["web"])],
                deploys: &[],
                shadowed: &[],
                removals: &[],
            },
            Case {
                name: "keys the device no longer follows are ignored",
                key: "group.a",
                apps: &["web"],
                before: &[("group.old", &["web"]), ("device.d", &["other"])],
                deploys: &[("web", "group.a")],
                shadowed: &[],
                removals: &[],
            },
        ];
        for case in cases {
            let before: Vec<AppliedRecord> = case
                .before
                .iter()
                .map(|(key, apps)| applied(key, apps))
                .collect();
            let apps: Vec<AppSpec> = case.apps.iter().map(|a| spec(a, case.key)).collect();
            let plan = plan(&targets, case.key, &apps, &before);
            let deploys: Vec<(String, String)> = plan
                .deploys
                .iter()
                .map(|(from, spec)| (spec.name.to_string(), from.clone()))
                .collect();
            let wanted: Vec<(String, String)> = case
                .deploys
                .iter()
                .map(|(a, k)| (a.to_string(), k.to_string()))
                .collect();
            assert_eq!(deploys, wanted, "{}: deploys", case.name);
            let shadowed: Vec<(String, String)> = plan
                .shadowed
                .iter()
                .map(|(spec, by)| (spec.name.to_string(), by.clone()))
                .collect();
            let wanted: Vec<(String, String)> = case
                .shadowed
                .iter()
                .map(|(a, k)| (a.to_string(), k.to_string()))
                .collect();
            assert_eq!(shadowed, wanted, "{}: shadowed", case.name);
            assert_eq!(plan.removals, case.removals, "{}: removals", case.name);
            // A handed-over app runs with the spec its new key gave it.
            for (from, spec) in &plan.deploys {
                let given = before
                    .iter()
                    .find(|a| &a.key == from)
                    .and_then(|a| a.specs.iter().find(|s| s.name == spec.name))
                    .unwrap_or(spec);
                assert_eq!(given, spec, "{}", case.name);
            }
        }
    }

    #[test]
    fn leaving_a_key_hands_its_apps_to_the_best_key_left_or_removes_them() {
        let targets: Vec<String> = ["device.d", "group.b"].map(String::from).to_vec();
        // (name, before, deploys (app, from), removals)
        type Row = (
            &'static str,
            &'static [(&'static str, &'static [&'static str])],
            &'static [(&'static str, &'static str)],
            &'static [&'static str],
        );
        let rows: [Row; 4] = [
            (
                "an app only the left group listed is removed",
                &[("group.a", &["web"])],
                &[],
                &["web"],
            ),
            (
                "an app the left group won passes to the next group with its spec",
                &[("group.a", &["web=from-a"]), ("group.b", &["web=from-b"])],
                &[("web", "group.b")],
                &[],
            ),
            (
                "an app the device key holds stays with it",
                &[
                    ("group.a", &["web"]),
                    ("device.d", &["web=mine"]),
                    ("group.b", &["web"]),
                ],
                &[("web", "device.d")],
                &[],
            ),
            (
                "a key never applied changes nothing",
                &[("group.b", &["web"])],
                &[],
                &[],
            ),
        ];
        for (name, before, deploys, removals) in rows {
            let before: Vec<AppliedRecord> =
                before.iter().map(|(k, apps)| applied(k, apps)).collect();
            let plan = leave(&targets, "group.a", &before);
            let got: Vec<(String, String)> = plan
                .deploys
                .iter()
                .map(|(from, spec)| (spec.name.to_string(), from.clone()))
                .collect();
            let wanted: Vec<(String, String)> = deploys
                .iter()
                .map(|(a, k)| (a.to_string(), k.to_string()))
                .collect();
            assert_eq!(got, wanted, "{name}: deploys");
            assert_eq!(plan.removals, removals, "{name}: removals");
            for (from, spec) in &plan.deploys {
                let given = before
                    .iter()
                    .find(|a| &a.key == from)
                    .and_then(|a| a.specs.iter().find(|s| s.name == spec.name))
                    .expect("a handed-over spec is its key's");
                assert_eq!(given, spec, "{name}");
            }
        }
    }
}
