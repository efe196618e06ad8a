//! Daemon configuration: an optional TOML file, overridden by command-line flags, with defaults
//! that need no file at all (state in a per-user directory when not root).

use crate::spec::{ByteSize, HumanDuration};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadAccess {
    /// Only root, the daemon's user and the control group may use the socket at all.
    Group,
    /// Anyone may read (ls, status, components, logs); changes still need the group.
    Any,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The control socket's path.
    pub socket: Option<PathBuf>,
    /// Members of this group may change state; the socket belongs to it.
    pub group: String,
    pub read_access: ReadAccess,
}

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
            socket: None,
            group: "cairn".to_string(),
            read_access: ReadAccess::Group,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the database lives.
    pub state_dir: PathBuf,
    pub control: ControlConfig,
    /// The largest component the device accepts.
    pub max_component_size: ByteSize,
    /// Log lines kept per app; older ones are pruned.
    pub log_lines_per_app: u64,
    /// Bytes of log text kept per app; older lines are pruned.
    pub log_bytes_per_app: ByteSize,
    /// Bytes of log text kept for all apps together; the oldest lines go first.
    pub log_bytes_total: ByteSize,
    /// What the store keeps, and how big it may grow.
    pub store: StoreConfig,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: HumanDuration,
    /// The cgroup (relative to the hierarchy root) under which each app gets its own.
    /// Default: cairnd's own service cgroup + `/apps` under systemd (Delegate=yes), else `cairn`.
    pub cgroup_parent: Option<String>,
    /// Memory all apps together may use (the parent cgroup's limit), so the device's own
    /// services keep room. Default: no cap.
    pub total_memory: Option<ByteSize>,
    /// CPU cores all apps together may use. Default: no cap.
    pub total_cpu: Option<f64>,
    /// One user every pool runs as (when cairnd runs as root). Default: none, each app's pool
    /// runs as a user and group of its own from `pool_ids` (see `pool_users`). Not root: pools
    /// run as cairnd's own user.
    pub pool_user: Option<String>,
    /// The ids (`FIRST-LAST`) apps' own pool users are given from. Default:
    /// `pool_users::DEFAULT_RANGE`.
    pub pool_ids: Option<String>,
    /// The upstream lattice; without it sync is off and nothing else changes.
    pub upstream: Option<UpstreamConfig>,
    /// A folder imported at every start (on images: the boot partition's `cairn/`): its
    /// `config.toml` is laid over this config and its `apps/*.toml` are deployed when new or
    /// changed. See `crate::import`.
    pub import_dir: Option<PathBuf>,
    /// Where apps' `device_secrets` are (`APP.toml`); see `crate::secrets`.
    pub secrets_dir: PathBuf,
    /// The Prometheus endpoint; off without it.
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]`: where `GET /metrics` is served (`control::metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// An address such as `127.0.0.1:9464`, or `0.0.0.0:9464` for a scraper elsewhere.
    pub listen: std::net::SocketAddr,
}

/// `[store]`: what the store keeps and how big it may grow (see `store::Policy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The most the state database may hold. Past it, what nothing uses is collected first,
    /// then new components are refused, saying so. Default: no budget.
    pub budget: Option<ByteSize>,
    /// Generations kept per app for rollback: the newest this many, and always the current.
    pub keep_generations: u32,
    /// How long a component nothing uses is kept before it is collected (a deploy or a fleet
    /// document may be about to use it).
    pub grace: HumanDuration,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            budget: None,
            keep_generations: 5,
            grace: HumanDuration(Duration::from_secs(10 * 60)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The NATS server, such as nats://nats.example:4222; the servers of a cluster separated
    /// by commas (tried in turn).
    pub nats: String,
    /// A NATS credentials file.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// A CA certificate (PEM) to verify the server's TLS certificate with.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// This device's id in the fleet. Default: an id made at first start and kept in the
    /// store (`cairnctl sync status` shows it); never the host name, which every device
    /// flashed from one image shares.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Public keys (hex) whose signed desired state this device accepts.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Root public keys (hex): the signing keys a root's delegation names (`cairnctl fleet
    /// delegate`) are accepted too, until the delegation expires or a newer one drops them.
    #[serde(default)]
    pub trusted_roots: Vec<String>,
    /// The largest artifact this device downloads.
    #[serde(default = "default_max_artifact")]
    pub max_artifact_size: ByteSize,
    /// The outbox of reports waiting for the upstream holds at most this much…
    #[serde(default = "default_outbox_bytes")]
    pub outbox_max_bytes: ByteSize,
    /// …and nothing older than this.
    #[serde(default = "default_outbox_age")]
    pub outbox_max_age: HumanDuration,
    /// While connected, a status report (with the device's and each app's figures) goes up
    /// this often, besides those a change sends. None is queued for it while offline: the
    /// report sent when the link returns carries the figures then.
    #[serde(default = "default_report_every")]
    pub report_every: HumanDuration,
    /// Replicas of the report stream when this device has to make it (`cairnctl fleet init
    /// --replicas` makes everything upstream): 3 on a JetStream cluster.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

fn default_replicas() -> usize {
    1
}

impl UpstreamConfig {
    /// The trusted signing keys and roots, parsed; neither at all is an error (every document
    /// would be refused).
    pub fn trust(&self) -> Result<TrustConfig, String> {
        let parse = |keys: &[String], setting: &str| {
            keys.iter()
                .map(|key| {
                    cairn_core::fleet::parse_public_key(key)
                        .map_err(|e| format!("upstream.{setting}: {e}"))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let trust = TrustConfig {
            keys: parse(&self.trusted_keys, "trusted_keys")?,
            roots: parse(&self.trusted_roots, "trusted_roots")?,
        };
        if trust.keys.is_empty() && trust.roots.is_empty() {
            return Err(
                "upstream.trusted_keys and upstream.trusted_roots are empty: the device would \
                 refuse every document; add the fleet's public key (cairnctl fleet keygen prints \
                 it) or its root key (which delegates signing keys: cairnctl fleet delegate)"
                    .into(),
            );
        }
        Ok(trust)
    }
}

/// Whom a device trusts: signing keys directly, and roots that delegate signing keys.
#[derive(Debug, Clone, Default)]
pub struct TrustConfig {
    pub keys: Vec<ed25519_dalek::VerifyingKey>,
    pub roots: Vec<ed25519_dalek::VerifyingKey>,
}

fn default_max_artifact() -> ByteSize {
    ByteSize(256 << 20)
}

fn default_outbox_bytes() -> ByteSize {
    ByteSize(64 << 20)
}

fn default_report_every() -> HumanDuration {
    HumanDuration(Duration::from_secs(5 * 60))
}

/// The bounds of `upstream.report_every`.
pub const REPORT_EVERY_RANGE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(24 * 3600));

fn default_outbox_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 24 * 3600))
}

impl Default for Config {
    fn default() -> Config {
        Config {
            state_dir: cairn_core::paths::default_state_dir(),
            control: ControlConfig::default(),
            max_component_size: ByteSize(256 << 20),
            log_lines_per_app: 10_000,
            log_bytes_per_app: ByteSize(16 << 20),
            log_bytes_total: ByteSize(128 << 20),
            store: StoreConfig::default(),
            drain_timeout: HumanDuration(Duration::from_secs(10)),
            cgroup_parent: None,
            total_memory: None,
            total_cpu: None,
            pool_user: None,
            pool_ids: None,
            upstream: None,
            import_dir: None,
            secrets_dir: PathBuf::from(crate::secrets::DEFAULT_DIR),
            metrics: None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::from_table(read_table(path)?).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Lays the TOML file `overlay` over the config file `base` (or the defaults): tables merge
    /// key by key, anything else in the overlay replaces what `base` said. On any problem with
    /// the overlay the base alone is returned, with the reason, so a bad overlay never stops
    /// the daemon; a bad base is fatal as ever.
    pub fn load_with_overlay(
        base: Option<&Path>,
        overlay: &Path,
    ) -> Result<(Config, Result<(), ConfigError>), ConfigError> {
        let base_table = match base {
            Some(path) => read_table(path)?,
            None => toml::Table::new(),
        };
        let base_config =
            Config::from_table(base_table.clone()).map_err(|message| ConfigError::Invalid {
                path: base.map(Path::to_path_buf).unwrap_or_default(),
                message,
            })?;
        let overlay_table = match read_table(overlay) {
            Ok(table) => table,
            Err(problem) => return Ok((base_config, Err(problem))),
        };
        if overlay_table.contains_key("import_dir") {
            return Ok((
                base_config,
                Err(ConfigError::ImportDirInOverlay {
                    path: overlay.to_path_buf(),
                }),
            ));
        }
        let mut merged = base_table;
        merge(&mut merged, overlay_table);
        match Config::from_table(merged) {
            Ok(config) => Ok((config, Ok(()))),
            Err(message) => Ok((
                base_config,
                Err(ConfigError::Invalid {
                    path: overlay.to_path_buf(),
                    message,
                }),
            )),
        }
    }

    /// Parses and checks what types alone cannot (the trusted keys), so a config that loads is
    /// one the daemon can start with. The error is the parser's or the check's message.
    pub(crate) fn from_table(table: toml::Table) -> Result<Config, String> {
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())?;
        if let Some(upstream) = &config.upstream {
            upstream.trust()?;
            cairn_core::fleet::server_addrs(&upstream.nats)
                .map_err(|e| format!("upstream.nats: {e}"))?;
            if let Some(device) = &upstream.device {
                cairn_core::fleet::check_name("upstream.device", device)?;
            }
            for group in &upstream.groups {
                cairn_core::fleet::check_name("group in upstream.groups", group)?;
            }
            let (low, high) = REPORT_EVERY_RANGE;
            if upstream.report_every.0 < low || upstream.report_every.0 > high {
                return Err(format!(
                    "upstream.report_every = \"{}\" is out of range: use between 10s and 24h",
                    upstream.report_every
                ));
            }
            if !(1..=5).contains(&upstream.replicas) {
                return Err(format!(
                    "upstream.replicas = {} is out of range: JetStream keeps 1 to 5 replicas",
                    upstream.replicas
                ));
            }
        }
        if config.log_bytes_per_app.0 < 64 << 10 {
            return Err(format!(
                "log_bytes_per_app = \"{}\" is too small: keep at least 64KiB (one request's output)",
                config.log_bytes_per_app
            ));
        }
        if config.log_bytes_total.0 < config.log_bytes_per_app.0 {
            return Err(format!(
                "log_bytes_total = \"{}\" is smaller than log_bytes_per_app = \"{}\": raise it, or lower log_bytes_per_app",
                config.log_bytes_total, config.log_bytes_per_app
            ));
        }
        if config.store.keep_generations == 0 {
            return Err("[store] keep_generations = 0 would keep no generation to roll back to: keep at least 1".into());
        }
        if let Some(budget) = config.store.budget {
            if budget.0 < 16 << 20 {
                return Err(format!(
                    "[store] budget = \"{budget}\" is too small: the store needs at least 16MiB"
                ));
            }
            // Log lines cost about their text again in rows and index: logs alone must not be
            // able to fill the budget and leave no room for components.
            if budget.0 < 2 * config.log_bytes_total.0 {
                return Err(format!(
                    "[store] budget = \"{budget}\" leaves no room beside the logs: log_bytes_total = \"{}\" may take about twice that; raise the budget or lower log_bytes_total",
                    config.log_bytes_total
                ));
            }
        }
        Ok(config)
    }

    pub fn socket(&self) -> PathBuf {
        self.control
            .socket
            .clone()
            .unwrap_or_else(cairn_core::paths::default_socket)
    }
}

/// A config file is a few KiB; this bounds what a wrong path (a device, a log) costs.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file: {0}")]
    Read(#[from] crate::regular_file::FileError),
    #[error("the config file {} is not valid TOML: {message}{line}", path.display())]
    Syntax {
        path: PathBuf,
        message: String,
        /// ` (line N)`, where the parser knew it.
        line: String,
    },
    #[error("the config file {} is not valid: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: `import_dir` cannot be set from the import folder itself; remove it", path.display())]
    ImportDirInOverlay { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
}

/// Reads a TOML file into a table; the error names the file and, for syntax, the line.
fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = crate::regular_file::read_text(path, MAX_CONFIG_BYTES)?;
    toml::from_str(&text).map_err(|e: toml::de::Error| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.message().to_string(),
        line: e
            .span()
            .map(|span| format!(" (line {})", text[..span.start].lines().count().max(1)))
            .unwrap_or_default(),
    })
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(over)) => merge(inner, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_budget_must_leave_room_beside_the_logs() {
        let parse = |text: &str| Config::from_table(toml::from_str(text).unwrap());
        let refused = parse("[store]\nbudget = \"64MiB\"\n").unwrap_err();
        assert!(
            refused.contains("leaves no room beside the logs"),
            "{refused}"
        );
        parse("log_bytes_total = \"16MiB\"\n[store]\nbudget = \"64MiB\"\n").unwrap();
        let refused = parse("[store]\nkeep_generations = 0\n").unwrap_err();
        assert!(refused.contains("keep at least 1"), "{refused}");
    }

    #[test]
    fn a_config_file_overrides_defaults_and_rejects_unknown_keys() {
        let config: Config = toml::from_str(
            "state_dir = \"/tmp/x\"\nmax_component_size = \"64MiB\"\n[control]\ngroup = \"ops\"\nread_access = \"any\"\n",
        )
        .unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.max_component_size, ByteSize(64 << 20));
        assert_eq!(config.control.group, "ops");
        assert_eq!(config.control.read_access, ReadAccess::Any);
        assert_eq!(config.log_lines_per_app, 10_000);
        let err = toml::from_str::<Config>("colour = 1\n").unwrap_err();
        assert!(err.message().contains("unknown field `colour`"), "{err}");
    }

    /// The identity point: a valid (weak) ed25519 public key, fine where nothing is verified.
    const KEY: &str = "0100000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn an_overlay_merges_tables_and_a_bad_one_leaves_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.toml");
        std::fs::write(
            &base,
            format!("drain_timeout = \"3s\"\n[upstream]\nnats = \"nats://a:4222\"\ngroups = [\"x\"]\ntrusted_keys = [\"{KEY}\"]\n"),
        )
        .unwrap();
        let overlay = dir.path().join("overlay.toml");
        std::fs::write(&overlay, "[upstream]\ndevice = \"pump-7\"\n").unwrap();
        let (config, outcome) = Config::load_with_overlay(Some(&base), &overlay).unwrap();
        outcome.unwrap();
        let upstream = config.upstream.unwrap();
        assert_eq!(upstream.nats, "nats://a:4222");
        assert_eq!(upstream.device.as_deref(), Some("pump-7"));
        assert_eq!(upstream.groups, vec!["x".to_string()]);
        assert_eq!(config.drain_timeout.0, Duration::from_secs(3));

        // A device id that would break the NATS subjects it goes into: the overlay is refused.
        std::fs::write(&overlay, "[upstream]\ndevice = \"pump.7\"\n").unwrap();
        let (config, outcome) = Config::load_with_overlay(Some(&base), &overlay).unwrap();
        let problem = outcome.unwrap_err().to_string();
        assert!(problem.contains("not a valid upstream.device"), "{problem}");
        assert!(config.upstream.unwrap().device.is_none());
        std::fs::write(&overlay, "[upstream\ndevice = 1\n").unwrap();
        let (config, outcome) = Config::load_with_overlay(Some(&base), &overlay).unwrap();
        let problem = outcome.unwrap_err();
        assert!(
            matches!(&problem, ConfigError::Syntax { line, .. } if line == " (line 1)"),
            "{problem}"
        );
        assert!(config.upstream.unwrap().device.is_none());

        std::fs::write(&overlay, "[upstream]\ntrusted_keys = []\n").unwrap();
        let (config, outcome) = Config::load_with_overlay(Some(&base), &overlay).unwrap();
        let problem = outcome.unwrap_err().to_string();
        assert!(
            problem.contains("trusted_keys and upstream.trusted_roots are empty"),
            "{problem}"
        );
        assert_eq!(config.upstream.unwrap().trusted_keys, vec![KEY.to_string()]);

        std::fs::write(&overlay, "drain_timeout = \"soon\"\n").unwrap();
        let (config, outcome) = Config::load_with_overlay(Some(&base), &overlay).unwrap();
        let problem = outcome.unwrap_err();
        assert!(matches!(problem, ConfigError::Invalid { .. }), "{problem}");
        assert!(
            problem.to_string().contains("overlay.toml is not valid"),
            "{problem}"
        );
        assert_eq!(config.drain_timeout.0, Duration::from_secs(3));
    }

    /// The packaged /etc/cairn/cairnd.toml documents every key with its default: it must
    /// parse as shipped (all commented out) and with every key switched on.
    #[test]
    fn the_packaged_config_file_names_real_keys() {
        let shipped = include_str!("../../packaging/cairnd.toml");
        let config: Config = toml::from_str(shipped).unwrap();
        assert!(config.upstream.is_none());
        let enabled: String = shipped
            .lines()
            .map(|line| {
                let rest = line.strip_prefix('#').unwrap_or(line);
                let is_setting = rest.starts_with('[')
                    || rest.split_once(" = ").is_some_and(|(key, _)| {
                        key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    });
                if is_setting {
                    rest.replace("<64 hex digits>", KEY)
                } else {
                    line.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = Config::from_table(toml::from_str(&enabled).unwrap()).unwrap();
        assert_eq!(config.drain_timeout.0, Duration::from_secs(10));
        let upstream = config.upstream.unwrap();
        assert_eq!(
            upstream.outbox_max_age.0,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(upstream.report_every.0, Duration::from_secs(300));
        assert_eq!(config.import_dir, Some(PathBuf::from("/boot/efi/cairn")));
    }
}
