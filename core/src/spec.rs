//! The typed app manifest. A manifest (TOML) becomes an `AppSpec` here, at the edge, and
//! nothing past this module sees raw TOML: names, sizes, durations and addresses are already
//! checked and carry their own types. The same types serialise to the JSON the store keeps, and
//! that JSON parses back to an equal `AppSpec`.

use crate::digest::Digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// Per-instance linear memory when the manifest does not say.
pub const DEFAULT_MEMORY: ByteSize = ByteSize(64 << 20);
/// Concurrent requests (instances) when the manifest does not say.
pub const DEFAULT_INSTANCES: u32 = 32;
/// Per-request deadline when the manifest does not say.
pub const DEFAULT_TIMEOUT: HumanDuration = HumanDuration(Duration::from_secs(5));

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the manifest is not valid: {0}")]
    Toml(String),
    #[error("the manifest is not valid: {0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> SpecError {
    SpecError::Invalid(message.into())
}

/// The longest app name.
pub const MAX_APP_NAME: usize = 63;

/// An app's name: 1 to 63 of `a-z 0-9 -`, starting with a letter or digit. It names cgroups,
/// log streams and fleet keys, so it is kept to what is safe in all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AppName(String);

impl AppName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AppName {
    type Err = SpecError;

    fn from_str(name: &str) -> Result<AppName, SpecError> {
        let valid_chars = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if name.is_empty() || name.len() > MAX_APP_NAME || !valid_chars || name.starts_with('-') {
            return Err(invalid(format!(
                "app name `{name}` is not allowed: use 1 to 63 characters of a-z, 0-9 and `-`, \
                 not starting with `-`"
            )));
        }
        Ok(AppName(name.to_string()))
    }
}

impl<'de> Deserialize<'de> for AppName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<AppName, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A number of bytes, written by people as `64MiB`, `512KiB`, `1GiB`, `10MB` or a bare count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<ByteSize, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                "`{text}` is not a size: write a number and a unit, such as 64MiB, 512KiB or 1GiB"
            ))
            }
        };
        let value: f64 = number.parse().map_err(|_| {
            format!("`{text}` is not a size: write a number and a unit, such as 64MiB")
        })?;
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("`{text}` is out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Count(bytes) => Ok(ByteSize(bytes)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written by people as `5s`, `250ms`, `1.5s`, `2m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<HumanDuration, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let seconds_per_unit = match unit.trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "`{text}` is not a duration: write a number and a unit (ms, s, m, h), such as 5s or 250ms"
                ))
            }
        };
        let value: f64 = number.parse().map_err(|_| {
            format!("`{text}` is not a duration: write a number and a unit, such as 5s")
        })?;
        Duration::try_from_secs_f64(value * seconds_per_unit)
            .map(HumanDuration)
            .map_err(|_| format!("`{text}` is out of range"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis % 3_600_000 == 0 && millis > 0 {
            write!(f, "{}h", millis / 3_600_000)
        } else if millis % 60_000 == 0 && millis > 0 {
            write!(f, "{}m", millis / 60_000)
        } else if millis % 1000 == 0 {
            write!(f, "{}s", millis / 1000)
        } else {
            write!(f, "{millis}ms")
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<HumanDuration, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The desired state of one app: what a manifest says, typed and checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: AppName,
    /// The component, by digest. cairnctl uploads a file named in a manifest and puts its digest
    /// here; the daemon only ever deploys what its store holds.
    pub component: Digest,
    /// `[http]`: where and how the app serves HTTP. Without it the app is a command
    /// (a component exporting `wasi:cli/run`): it serves nothing and runs when `cairnctl run`
    /// or one of its `[[schedule]]`s says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, deserialize_with = "quiet::env")]
    pub env: BTreeMap<String, String>,
    /// Runtime configuration the guest reads through `wasi:config/store` or Spin's
    /// `variables`. Left out of the stored JSON when empty, so a cairn from before `[config]`
    /// still reads the specs that do not use it.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "quiet::config"
    )]
    pub config: BTreeMap<String, String>,
    /// Read by the guest exactly as `[config]`, shown to nobody: `status`, logs, reports and
    /// fleet status name the keys at most.
    #[serde(default, skip_serializing_if = "Secrets::is_empty")]
    pub secrets: Secrets,
    /// Secrets the device supplies (from `/etc/cairn/secrets/APP.toml`, read by cairnd at each
    /// pool start), by name: the only way a fleet app gets one, since fleet documents are
    /// signed, not encrypted. Read by the guest as `[secrets]` are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_secrets: Vec<String>,
    /// The app's key-value store (`wasi:keyvalue`, Spin's `key-value`). Without this table
    /// every open is refused (`access-denied`), as Spin refuses a store it was not granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyvalue: Option<KeyValueSpec>,
    /// `[[schedule]]`: requests cairnd sends the app on a timer.
    #[serde(default, rename = "schedule", skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleSpec>,
    /// `[outbound]`: where the app may send HTTP requests. Without it every one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundSpec>,
}

/// `[outbound]`: the hosts an app may call and the bounds of each call (`crate::outbound`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundSpec {
    /// Entries in Spin's `allowed_outbound_hosts` form: `scheme://host[:port]`.
    pub allowed_hosts: Vec<crate::outbound::AllowedHost>,
    /// How long one call may take, from connecting to the last byte of the response; at most
    /// `[limits] timeout`, which it defaults to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// The largest response body a call reads; past it the body ends with an error.
    #[serde(default = "default_max_response")]
    pub max_response: ByteSize,
    /// A PEM file of more certificate authorities to trust for HTTPS, besides the system's
    /// (read by cairnd when the app starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// `[outbound] max_response` when the table leaves it out.
pub const DEFAULT_MAX_RESPONSE: ByteSize = ByteSize(16 << 20);
/// The bounds of `[outbound] max_response`.
pub const MAX_RESPONSE_RANGE: (u64, u64) = (1 << 10, 1 << 30);

fn default_max_response() -> ByteSize {
    DEFAULT_MAX_RESPONSE
}

impl OutboundSpec {
    /// How long one call may take, given the app's limits.
    pub fn call_timeout(&self, limits: &Limits) -> Duration {
        self.timeout
            .map_or(limits.timeout.0, |t| t.0.min(limits.timeout.0))
    }

    /// Whether any entry allows HTTPS (the pool then needs certificate authorities).
    pub fn allows_https(&self) -> bool {
        self.allowed_hosts
            .iter()
            .any(|entry| entry.scheme != crate::outbound::SchemeRule::Http)
    }
}

/// One `[[schedule]]`: a request to `path` of the app, `every` so long or at the times of a
/// `cron` expression (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Names the schedule in `status` and its runs; unique within the app.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The path requested of an HTTP app; a command app's schedules have none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// The arguments a command app is run with (after its name); HTTP apps' schedules have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default = "default_schedule_method")]
    pub method: String,
    /// What a run missed while cairnd was not running becomes at the next start.
    #[serde(default)]
    pub missed: Missed,
}

/// `[[schedule]] missed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    /// Runs missed while cairnd was stopped (however many) run once at the next start.
    #[default]
    Once,
    /// They are dropped: the next run is the next one due.
    Skip,
}

/// At most this many `[[schedule]]`s per app.
pub const MAX_SCHEDULES: usize = 16;
/// The bounds of `[[schedule]] every`.
pub const SCHEDULE_EVERY_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(31 * 24 * 3600));

fn default_schedule_method() -> String {
    "POST".to_string()
}

/// `[keyvalue]`: the app's one store and its bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValueSpec {
    /// The bytes of keys plus values the store may hold; a write past it fails with the
    /// interface's error.
    #[serde(default = "default_kv_quota")]
    pub quota: ByteSize,
}

/// `[keyvalue] quota` when the table leaves it out.
pub const DEFAULT_KV_QUOTA: ByteSize = ByteSize(16 << 20);
/// The bounds of `[keyvalue] quota`.
pub const KV_QUOTA_RANGE: (u64, u64) = (1 << 10, 1 << 30);

fn default_kv_quota() -> ByteSize {
    DEFAULT_KV_QUOTA
}

/// An app's `[secrets]`. Its `Debug` names the keys only, so no log line or error that prints
/// a spec can carry a value.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secrets(#[serde(deserialize_with = "quiet::secrets")] pub BTreeMap<String, String>);

/// Reading `[env]`, `[config]` and `[secrets]` without ever quoting a value: serde's own
/// errors show what they refused (`invalid type: integer \`1234\``), and these errors reach
/// logs, the import report and readers. A value that is not a string, or a table that is not
/// a table, is refused by key and table name only.
mod quiet {
    use serde::de::{Deserializer, Error, MapAccess, Visitor};
    use std::collections::BTreeMap;
    use std::fmt;

    pub fn env<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(Table("env"))
    }

    pub fn config<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(Table("config"))
    }

    pub fn secrets<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(Table("secrets"))
    }

    struct Table(&'static str);

    /// Everything but a table is refused the same way, without its value.
    macro_rules! refuse {
        ($($method:ident: $type:ty),*) => {$(
            fn $method<E: Error>(self, _: $type) -> Result<Self::Value, E> {
                Err(E::custom(format!("[{}] must be a table of strings", self.0)))
            }
        )*};
    }

    impl<'de> Visitor<'de> for Table {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "[{}] as a table of strings", self.0)
        }

        refuse!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(A::Error::custom(format!(
                "[{}] must be a table of strings",
                self.0
            )))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut values = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                let value = map.next_value::<Text>().map_err(|_| {
                    A::Error::custom(format!(
                        "[{}] `{}` must be a string (quote it)",
                        self.0,
                        super::clip(&key)
                    ))
                })?;
                values.insert(key, value.0);
            }
            Ok(values)
        }
    }

    /// A string value; anything else fails, and the caller words the error.
    struct Text(String);

    impl<'de> serde::Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
            struct Only;
            impl<'de> Visitor<'de> for Only {
                type Value = Text;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_str<E: Error>(self, v: &str) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_string<E: Error>(self, v: String) -> Result<Text, E> {
                    Ok(Text(v))
                }
            }
            d.deserialize_string(Only)
        }
    }
}

/// At most this many `device_secrets` per app.
pub const MAX_DEVICE_SECRETS: usize = 64;

/// A key of `[config]` or `[secrets]`, or a name in `device_secrets`.
fn config_key_fits(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_CONFIG_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A key as an error message shows it: at most 64 characters (a key can be as long as the
/// manifest, and the message travels in a bounded header).
pub(crate) fn clip(key: &str) -> String {
    match key.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &key[..cut]),
        None => key.to_string(),
    }
}

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()?;
        f.write_str(" (values hidden)")
    }
}

/// Where a value the guest asked for by key came from (`AppSpec::config_value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    Config,
    Secret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Where the app's HTTP listener binds, such as `127.0.0.1:8080` or `0.0.0.0:80`.
    pub listen: SocketAddr,
    /// A path the app answers 2xx on when healthy; a new generation goes live only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// How long a client has to send a whole request head, counted from the connection's
    /// start or from the first byte of a later request. Default: `DEFAULT_HEADER_TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<HumanDuration>,
    /// How long a kept-alive connection may wait for its next request. Default:
    /// `DEFAULT_IDLE_TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<HumanDuration>,
    /// How long a response may wait for the client to take any of it before the connection is
    /// closed (a client that stops reading). Default: `DEFAULT_SEND_TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_timeout: Option<HumanDuration>,
    /// Largest request head (request line and headers); larger ones are answered 431.
    /// Default: `DEFAULT_MAX_HEADER_SIZE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_size: Option<ByteSize>,
    /// Largest request body; a larger declared one is answered 413 without reading it, a
    /// longer chunked one is cut off at the limit. Default: `DEFAULT_MAX_BODY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<ByteSize>,
    /// Connections the app holds open at once; further ones wait in the listen backlog until
    /// one closes. Default: `DEFAULT_MAX_CONNECTIONS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// The most an app's `[env]` keys and values may hold together: a pool is started with them
/// in one message of the pool protocol, which is bounded.
pub const MAX_ENV_BYTES: usize = 256 << 10;
/// The most an app's `[config]` and `[secrets]` keys and values may hold together, for the
/// same reason as `MAX_ENV_BYTES`.
pub const MAX_CONFIG_BYTES: usize = 256 << 10;
/// The longest `[config]` or `[secrets]` key.
pub const MAX_CONFIG_KEY: usize = 128;

pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_HEADER_SIZE: u64 = 16 << 10;
pub const DEFAULT_MAX_BODY: u64 = 16 << 20;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;

/// An app's connection limits with every default filled in (`HttpSpec::connection_limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub max_header_size: usize,
    pub max_body: u64,
    pub max_connections: u32,
}

impl HttpSpec {
    pub fn connection_limits(&self) -> ConnectionLimits {
        let duration = |value: Option<HumanDuration>, default| value.map_or(default, |d| d.0);
        ConnectionLimits {
            header_timeout: duration(self.header_timeout, DEFAULT_HEADER_TIMEOUT),
            idle_timeout: duration(self.idle_timeout, DEFAULT_IDLE_TIMEOUT),
            send_timeout: duration(self.send_timeout, DEFAULT_SEND_TIMEOUT),
            max_header_size: self
                .max_header_size
                .map_or(DEFAULT_MAX_HEADER_SIZE, |size| size.0)
                as usize,
            max_body: self.max_body.map_or(DEFAULT_MAX_BODY, |size| size.0),
            max_connections: self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        }
    }

    /// What `AppSpec::validate` checks of `[http]`.
    fn validate(&self) -> Result<(), SpecError> {
        self.validate_limits()?;
        if let Some(health) = &self.health {
            if !health.starts_with('/') {
                return Err(invalid(format!(
                    "[http] health = \"{health}\" must be a path starting with /, such as \"/health\""
                )));
            }
        }
        if self.listen.port() == 0 {
            return Err(invalid(format!(
                "[http] listen = \"{}\" has port 0: give a fixed port, such as 127.0.0.1:8080",
                self.listen
            )));
        }
        Ok(())
    }

    /// The range checks of the connection limits.
    fn validate_limits(&self) -> Result<(), SpecError> {
        let seconds = |key: &str, value: Option<HumanDuration>| match value {
            Some(d) if d.0 < Duration::from_millis(100) || d.0 > Duration::from_secs(3600) => {
                Err(invalid(format!(
                    "[http] {key} = \"{d}\" is out of range: use between 100ms and 1h"
                )))
            }
            _ => Ok(()),
        };
        seconds("header_timeout", self.header_timeout)?;
        seconds("idle_timeout", self.idle_timeout)?;
        seconds("send_timeout", self.send_timeout)?;
        if let Some(size) = self.max_header_size {
            if size.0 < 1 << 10 || size.0 > 1 << 20 {
                return Err(invalid(format!(
                    "[http] max_header_size = \"{size}\" is out of range: use between 1KiB and 1MiB"
                )));
            }
        }
        if let Some(connections) = self.max_connections {
            if connections == 0 || connections > 100_000 {
                return Err(invalid(format!(
                    "[http] max_connections = {connections} is out of range: use between 1 and 100000"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory one instance may grow to (each request runs in its own instance).
    pub memory: ByteSize,
    /// Requests served at once; one more is answered 503 at once instead of queueing.
    pub instances: u32,
    /// Deadline for one request, enforced by epoch interruption.
    pub timeout: HumanDuration,
    /// CPU cores the app's pool may use (cgroup CPU quota). Default: no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory the whole pool process may use (cgroup memory limit). Default: `memory` times
    /// `instances`, plus `POOL_BASELINE` for the runtime itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total: Option<ByteSize>,
    /// Processes and threads the pool may have (cgroup pids limit). Default: `DEFAULT_PIDS`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// With no request for this long the pool exits; the next connection starts it again.
    /// Default: never (the pool stays warm).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<HumanDuration>,
    /// Bytes of output (stdout, stderr) per second the pool passes on to the app's log, in
    /// bursts of up to `LOG_BURST_SECONDS` of it; beyond, output is dropped and counted.
    /// Default: `DEFAULT_LOG_RATE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_rate: Option<ByteSize>,
}

/// Memory a pool needs besides its instances' linear memories (runtime, code, buffers).
pub const POOL_BASELINE: ByteSize = ByteSize(64 << 20);
/// Processes and threads of a pool when the manifest does not say.
pub const DEFAULT_PIDS: u32 = 64;
/// Log output per second a pool passes on when the manifest does not say: far more than an
/// app that logs its requests writes, and little enough that a flooding app costs cairnd's
/// log writer a few percent of a core.
pub const DEFAULT_LOG_RATE: ByteSize = ByteSize(1 << 20);
/// A burst of log output may be this many seconds of `log_rate` at once.
pub const LOG_BURST_SECONDS: u64 = 4;

impl Limits {
    /// The pool's memory limit: `memory_total`, or derived from the per-instance cap.
    pub fn pool_memory(&self) -> ByteSize {
        self.memory_total.unwrap_or(ByteSize(
            self.memory
                .0
                .saturating_mul(self.instances as u64)
                .saturating_add(POOL_BASELINE.0),
        ))
    }

    pub fn log_rate(&self) -> ByteSize {
        self.log_rate.unwrap_or(DEFAULT_LOG_RATE)
    }

    pub fn pool_pids(&self) -> u32 {
        self.pids.unwrap_or(DEFAULT_PIDS)
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory: DEFAULT_MEMORY,
            instances: DEFAULT_INSTANCES,
            timeout: DEFAULT_TIMEOUT,
            cpu: None,
            memory_total: None,
            pids: None,
            idle: None,
            log_rate: None,
        }
    }
}

/// The most arguments a run of a command app takes (`cairnctl run`, `[[schedule]] args`)…
pub const MAX_RUN_ARGS: usize = 256;
/// …and the bytes they may hold together.
pub const MAX_RUN_ARG_BYTES: usize = 64 << 10;

/// Checks the arguments of one run of a command app.
pub fn check_run_args(args: &[String]) -> Result<(), String> {
    let bytes: usize = args.iter().map(|arg| arg.len() + 1).sum();
    if args.len() > MAX_RUN_ARGS || bytes > MAX_RUN_ARG_BYTES {
        return Err(format!(
            "{} arguments of {bytes} bytes: at most {MAX_RUN_ARGS} arguments of {MAX_RUN_ARG_BYTES} bytes together are allowed",
            args.len()
        ));
    }
    if args.iter().any(|arg| arg.contains('\0')) {
        return Err("an argument holds a NUL byte".to_string());
    }
    Ok(())
}

/// A command app's runs under way at once, at most: each is a pool process of its own.
pub const MAX_RUNS: u32 = 4;

impl AppSpec {
    /// The memory the app's cgroup may use: `[limits] memory_total`, or by default what its
    /// pool needs (an HTTP app: `memory` per instance plus the pool's own), for a command app
    /// what `MAX_RUNS` pools of one instance each need.
    pub fn pool_memory(&self) -> ByteSize {
        match (self.is_command(), self.limits.memory_total) {
            (_, Some(total)) => total,
            (false, None) => self.limits.pool_memory(),
            (true, None) => ByteSize(
                self.limits
                    .memory
                    .0
                    .saturating_add(POOL_BASELINE.0)
                    .saturating_mul(MAX_RUNS as u64),
            ),
        }
    }

    /// The processes and threads of the app's cgroup: `[limits] pids`, or by default a pool's
    /// (`MAX_RUNS` of them for a command app).
    pub fn pool_pids(&self) -> u32 {
        match (self.is_command(), self.limits.pids) {
            (true, None) => self.limits.pool_pids() * MAX_RUNS,
            _ => self.limits.pool_pids(),
        }
    }

    /// Where the app listens; `None` for a command app.
    pub fn listen(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|http| http.listen)
    }

    /// A command app: no `[http]`, run by `cairnctl run` and its schedules.
    pub fn is_command(&self) -> bool {
        self.http.is_none()
    }

    /// Parses a manifest as sent to the daemon: `component` must already be a digest.
    pub fn from_manifest(text: &str) -> Result<AppSpec, SpecError> {
        let spec: AppSpec = toml::from_str(text).map_err(|err| {
            let message = err.message().to_string();
            let location = err
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            SpecError::Toml(format!("{message}{location}"))
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses the JSON form the store keeps.
    pub fn from_stored_json(text: &str) -> Result<AppSpec, SpecError> {
        serde_json::from_str(text).map_err(|err| SpecError::Invalid(err.to_string()))
    }

    pub fn to_stored_json(&self) -> String {
        serde_json::to_string(self).expect("an AppSpec always serialises")
    }

    /// Checks what types alone cannot say (`from_manifest` does this; specs that arrive by
    /// other roads, such as a fleet document, call it themselves).
    pub fn validate(&self) -> Result<(), SpecError> {
        let limits = &self.limits;
        if limits.memory.0 < 64 << 10 || limits.memory.0 > 4 << 30 {
            return Err(invalid(format!(
                "[limits] memory = \"{}\" is out of range: use between 64KiB and 4GiB",
                limits.memory
            )));
        }
        if limits.instances == 0 || limits.instances > 10_000 {
            return Err(invalid(format!(
                "[limits] instances = {} is out of range: use between 1 and 10000",
                limits.instances
            )));
        }
        if limits.timeout.0 < Duration::from_millis(1)
            || limits.timeout.0 > Duration::from_secs(3600)
        {
            return Err(invalid(format!(
                "[limits] timeout = \"{}\" is out of range: use between 1ms and 1h",
                limits.timeout
            )));
        }
        if let Some(cpu) = limits.cpu {
            if !(cpu > 0.0 && cpu <= 1024.0) {
                return Err(invalid(format!(
                    "[limits] cpu = {cpu} is out of range: give cores as a number above 0, such as 0.5"
                )));
            }
        }
        if let Some(total) = limits.memory_total {
            if total.0 < 8 << 20 {
                return Err(invalid(format!(
                    "[limits] memory_total = \"{total}\" is too small for a pool: use at least 8MiB"
                )));
            }
        }
        if let Some(pids) = limits.pids {
            if pids < 8 {
                return Err(invalid(format!(
                    "[limits] pids = {pids} is too small: a pool needs at least 8 threads"
                )));
            }
        }
        if let Some(rate) = limits.log_rate {
            if rate.0 < 1 << 10 {
                return Err(invalid(format!(
                    "[limits] log_rate = \"{rate}\" is too small: use at least 1KiB (per second)"
                )));
            }
        }
        if let Some(idle) = limits.idle {
            if idle.0 < Duration::from_millis(100) {
                return Err(invalid(format!(
                    "[limits] idle = \"{idle}\" is too short: use at least 100ms, or leave it out to keep the pool warm"
                )));
            }
        }
        match &self.http {
            Some(http) => http.validate()?,
            None if limits.idle.is_some() => {
                return Err(invalid(
                    "[limits] idle is for apps that serve HTTP; this app has no [http] table, so it is a command and no pool waits between its runs".to_string(),
                ))
            }
            None if limits.instances != DEFAULT_INSTANCES => {
                return Err(invalid(format!(
                    "[limits] instances is for apps that serve HTTP; this app has no [http] table, so it is a command: each run is one instance, at most {MAX_RUNS} runs at once"
                )))
            }
            None => {}
        }
        let env_bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(invalid(format!(
                "[env] holds {env_bytes} bytes; at most {MAX_ENV_BYTES} are allowed (put large data in the component or a file it is given)"
            )));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(format!(
                    "[env] key `{}` is not a valid variable name",
                    clip(key)
                )));
            }
        }
        self.validate_schedules()?;
        if let Some(kv) = &self.keyvalue {
            let (low, high) = KV_QUOTA_RANGE;
            if kv.quota.0 < low || kv.quota.0 > high {
                return Err(invalid(format!(
                    "[keyvalue] quota = \"{}\" is out of range: use between {} and {}",
                    kv.quota,
                    ByteSize(low),
                    ByteSize(high)
                )));
            }
        }
        self.validate_outbound()?;
        self.validate_config()
    }

    fn validate_outbound(&self) -> Result<(), SpecError> {
        let Some(outbound) = &self.outbound else {
            return Ok(());
        };
        if outbound.allowed_hosts.len() > crate::outbound::MAX_ALLOWED_HOSTS {
            return Err(invalid(format!(
                "[outbound] allowed_hosts has {} entries; at most {} are allowed",
                outbound.allowed_hosts.len(),
                crate::outbound::MAX_ALLOWED_HOSTS
            )));
        }
        let (low, high) = MAX_RESPONSE_RANGE;
        if outbound.max_response.0 < low || outbound.max_response.0 > high {
            return Err(invalid(format!(
                "[outbound] max_response = \"{}\" is out of range: use between {} and {}",
                outbound.max_response,
                ByteSize(low),
                ByteSize(high)
            )));
        }
        if let Some(timeout) = outbound.timeout {
            if timeout.0 < Duration::from_millis(1) || timeout > self.limits.timeout {
                return Err(invalid(format!(
                    "[outbound] timeout = \"{timeout}\" is out of range: use between 1ms and the app's [limits] timeout ({})",
                    self.limits.timeout
                )));
            }
        }
        if let Some(path) = &outbound.ca_file {
            if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
                return Err(invalid(format!(
                    "[outbound] ca_file = \"{}\" must be an absolute path on the device",
                    clip(path)
                )));
            }
        }
        Ok(())
    }

    fn validate_schedules(&self) -> Result<(), SpecError> {
        if self.schedules.len() > MAX_SCHEDULES {
            return Err(invalid(format!(
                "{} [[schedule]] tables; at most {MAX_SCHEDULES} are allowed",
                self.schedules.len()
            )));
        }
        for (index, schedule) in self.schedules.iter().enumerate() {
            let name = &schedule.name;
            let named = |what: String| invalid(format!("[[schedule]] `{}`: {what}", clip(name)));
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(named("a name is 1 to 64 of a-z, 0-9, - and _".to_string()));
            }
            if self.schedules[..index].iter().any(|s| &s.name == name) {
                return Err(named("two schedules have this name".to_string()));
            }
            match (&schedule.every, &schedule.cron) {
                (Some(every), None) => {
                    let (low, high) = SCHEDULE_EVERY_RANGE;
                    if every.0 < low || every.0 > high {
                        return Err(named(format!(
                            "every = \"{every}\" is out of range: use between 1s and 744h (31 days)"
                        )));
                    }
                }
                (None, Some(cron)) => {
                    let parsed = cron.parse::<crate::cron::Cron>().map_err(named)?;
                    if parsed.next_after(0).is_none() {
                        return Err(named(format!(
                            "cron = \"{}\" matches no date (such as 30 February)",
                            clip(cron)
                        )));
                    }
                }
                _ => {
                    return Err(named(
                        "give either `every` (such as \"10m\") or `cron` (such as \"0 * * * *\"), one of them".to_string(),
                    ))
                }
            }
            // What a request target may hold (RFC 3986's characters); the rest must be
            // percent-encoded.
            let usable =
                |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%[]".contains(&b);
            if self.is_command() {
                if !schedule.path.is_empty() {
                    return Err(named(
                        "this app has no [http] table, so it is a command: a schedule runs it, with `args` if it needs any, and has no `path`".to_string(),
                    ));
                }
                check_run_args(&schedule.args).map_err(|e| named(format!("args: {e}")))?;
                if schedule.method != "POST" {
                    return Err(named(
                        "`method` is for HTTP apps; this app has no [http] table, so it is a command that a schedule runs".to_string(),
                    ));
                }
                continue;
            }
            if !schedule.args.is_empty() {
                return Err(named(
                    "`args` are for command apps; this app serves HTTP, so a schedule requests its `path`".to_string(),
                ));
            }
            if !schedule.path.starts_with('/')
                || schedule.path.len() > 1024
                || !schedule.path.bytes().all(usable)
            {
                return Err(named(format!(
                    "path = \"{}\" must start with / and hold only the characters of a URL path and query, others percent-encoded (at most 1024 bytes)",
                    clip(&schedule.path)
                )));
            }
            if !matches!(schedule.method.as_str(), "GET" | "POST" | "PUT") {
                return Err(named(format!(
                    "method = \"{}\": use GET, POST or PUT",
                    clip(&schedule.method)
                )));
            }
        }
        Ok(())
    }

    fn validate_config(&self) -> Result<(), SpecError> {
        let tables = [("config", &self.config), ("secrets", &self.secrets.0)];
        let mut bytes = 0;
        for (table, entries) in tables {
            for (key, value) in entries {
                if !config_key_fits(key) {
                    return Err(invalid(format!(
                        "[{table}] key `{}` is not allowed: use 1 to {MAX_CONFIG_KEY} letters, digits, `_`, `.` or `-` (Spin components read lower-case names such as `api_url`)",
                        clip(key)
                    )));
                }
                bytes += key.len() + value.len();
            }
        }
        if self.device_secrets.len() > MAX_DEVICE_SECRETS {
            return Err(invalid(format!(
                "device_secrets names {} secrets; at most {MAX_DEVICE_SECRETS} are allowed",
                self.device_secrets.len()
            )));
        }
        for (index, key) in self.device_secrets.iter().enumerate() {
            if !config_key_fits(key) {
                return Err(invalid(format!(
                    "device_secrets names `{}`, which is not allowed: use 1 to {MAX_CONFIG_KEY} letters, digits, `_`, `.` or `-`",
                    clip(key)
                )));
            }
            if self.device_secrets[..index].contains(key) {
                return Err(invalid(format!("device_secrets names `{key}` twice")));
            }
            if self.config.contains_key(key) || self.secrets.0.contains_key(key) {
                return Err(invalid(format!(
                    "`{key}` is in device_secrets and in [config] or [secrets]: give it in one place"
                )));
            }
        }
        if let Some(key) = self.config.keys().find(|k| self.secrets.0.contains_key(*k)) {
            return Err(invalid(format!(
                "`{key}` is in both [config] and [secrets]: give it in one of them"
            )));
        }
        if bytes > MAX_CONFIG_BYTES {
            return Err(invalid(format!(
                "[config] and [secrets] hold {bytes} bytes; at most {MAX_CONFIG_BYTES} are allowed (put large data in the component or in key-value state)"
            )));
        }
        Ok(())
    }

    /// The value the guest reads for `key`, from `[config]` or `[secrets]` (a key is never
    /// in both).
    pub fn config_value(&self, key: &str) -> Option<(&str, ConfigSource)> {
        self.config
            .get(key)
            .map(|v| (v.as_str(), ConfigSource::Config))
            .or_else(|| {
                self.secrets
                    .0
                    .get(key)
                    .map(|v| (v.as_str(), ConfigSource::Secret))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn manifest(extra: &str) -> String {
        format!("name = \"hello\"\ncomponent = \"{DIGEST}\"\n[http]\nlisten = \"127.0.0.1:8080\"\n{extra}")
    }

    #[test]
    fn parses_the_documented_manifest_with_defaults() {
        let spec = AppSpec::from_manifest(&manifest("")).unwrap();
        assert_eq!(spec.name.as_str(), "hello");
        assert_eq!(spec.limits, Limits::default());
        let spec = AppSpec::from_manifest(&manifest(
            "[limits]\nmemory = \"32MiB\"\ninstances = 4\ntimeout = \"250ms\"\ncpu = 0.5\n[env]\nGREETING = \"hi\"\n",
        ))
        .unwrap();
        assert_eq!(spec.limits.memory, ByteSize(32 << 20));
        assert_eq!(spec.limits.instances, 4);
        assert_eq!(spec.limits.timeout.0, Duration::from_millis(250));
        assert_eq!(spec.limits.cpu, Some(0.5));
        assert_eq!(spec.env["GREETING"], "hi");
        assert_eq!(
            spec.limits.pool_memory(),
            ByteSize((32 << 20) * 4 + (64 << 20))
        );
        assert_eq!(spec.limits.pool_pids(), DEFAULT_PIDS);
        let spec =
            AppSpec::from_manifest(&manifest("[limits]\nmemory_total = \"96MiB\"\npids = 20\n"))
                .unwrap();
        assert_eq!(spec.limits.pool_memory(), ByteSize(96 << 20));
        assert_eq!(spec.limits.pool_pids(), 20);
    }

    #[test]
    fn connection_limits_have_defaults_and_take_the_manifest() {
        let spec = AppSpec::from_manifest(&manifest("")).unwrap();
        let limits = spec.http.as_ref().unwrap().connection_limits();
        assert_eq!(limits.header_timeout, DEFAULT_HEADER_TIMEOUT);
        assert_eq!(limits.max_body, DEFAULT_MAX_BODY);
        assert_eq!(limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        // A spec without them stores as before (stored generations compare equal).
        assert!(!spec.to_stored_json().contains("max_body"));

        let spec = AppSpec::from_manifest(&manifest(
            "header_timeout = \"2s\"\nidle_timeout = \"1m\"\nsend_timeout = \"3s\"\nmax_header_size = \"4KiB\"\nmax_body = \"1MiB\"\nmax_connections = 7\n",
        ))
        .unwrap();
        let limits = spec.http.as_ref().unwrap().connection_limits();
        assert_eq!(limits.header_timeout, Duration::from_secs(2));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(limits.send_timeout, Duration::from_secs(3));
        assert_eq!(limits.max_header_size, 4096);
        assert_eq!(limits.max_body, 1 << 20);
        assert_eq!(limits.max_connections, 7);
    }

    #[test]
    fn device_secrets_are_names_that_no_other_table_holds() {
        let with = |top: &str, tables: &str| {
            AppSpec::from_manifest(&format!(
                "{top}\n{}{tables}",
                manifest("").replace("[http]", "\n[http]")
            ))
        };
        let spec = with("device_secrets = [\"api_token\", \"db.pw\"]", "").unwrap();
        assert_eq!(spec.device_secrets, ["api_token", "db.pw"]);
        assert_eq!(
            AppSpec::from_stored_json(&spec.to_stored_json()).unwrap(),
            spec
        );
        for (top, tables, says) in [
            ("device_secrets = [\"a b\"]", "", "is not allowed"),
            ("device_secrets = [\"k\", \"k\"]", "", "twice"),
            (
                "device_secrets = [\"k\"]",
                "[config]\nk = \"v\"\n",
                "in device_secrets and in [config] or [secrets]",
            ),
            (
                "device_secrets = [\"k\"]",
                "[secrets]\nk = \"v\"\n",
                "in device_secrets and in [config] or [secrets]",
            ),
        ] {
            let error = with(top, tables).unwrap_err().to_string();
            assert!(error.contains(says), "{top}: {error}");
        }
    }

    #[test]
    fn outbound_is_read_with_defaults_and_kept_as_written() {
        let spec = AppSpec::from_manifest(&manifest(
            "[limits]
timeout = \"5s\"
[outbound]
allowed_hosts = [\"https://*.example.com\", \"*://10.0.0.0/8:8000..8100\"]
",
        ))
        .unwrap();
        let outbound = spec.outbound.clone().unwrap();
        assert_eq!(outbound.max_response, DEFAULT_MAX_RESPONSE);
        assert_eq!(outbound.call_timeout(&spec.limits), Duration::from_secs(5));
        assert!(outbound.allows_https());
        let stored = AppSpec::from_stored_json(&spec.to_stored_json()).unwrap();
        assert_eq!(stored, spec);
        assert!(spec.to_stored_json().contains("\"https://*.example.com\""));
        assert!(AppSpec::from_manifest(&manifest(""))
            .unwrap()
            .outbound
            .is_none());
        assert!(!AppSpec::from_manifest(&manifest(""))
            .unwrap()
            .to_stored_json()
            .contains("outbound"));
    }

    #[test]
    fn keyvalue_has_a_default_quota_within_its_bounds() {
        let spec = AppSpec::from_manifest(&manifest("")).unwrap();
        assert_eq!(spec.keyvalue, None);
        assert!(!spec.to_stored_json().contains("keyvalue"));
        let spec = AppSpec::from_manifest(&manifest(
            "[keyvalue]
",
        ))
        .unwrap();
        assert_eq!(spec.keyvalue.unwrap().quota, DEFAULT_KV_QUOTA);
        let spec = AppSpec::from_manifest(&manifest(
            "[keyvalue]
quota = \"1GiB\"
",
        ))
        .unwrap();
        assert_eq!(spec.keyvalue.as_ref().unwrap().quota, ByteSize(1 << 30));
        assert_eq!(
            AppSpec::from_stored_json(&spec.to_stored_json()).unwrap(),
            spec
        );
        for (extra, said) in [
            (
                "[keyvalue]
quota = \"512\"
",
                "[keyvalue] quota = \"512B\" is out of range",
            ),
            (
                "[keyvalue]
quota = \"2GiB\"
",
                "use between 1KiB and 1GiB",
            ),
            (
                "[keyvalue]
store = \"x\"
",
                "unknown field `store`",
            ),
        ] {
            let error = AppSpec::from_manifest(&manifest(extra))
                .unwrap_err()
                .to_string();
            assert!(error.contains(said), "{extra}: {error}");
        }
    }

    #[test]
    fn schedules_take_an_interval_or_a_cron_and_say_what_is_wrong() {
        let spec = AppSpec::from_manifest(&manifest(
            "[[schedule]]\nname = \"upload\"\ncron = \"0 * * * *\"\npath = \"/upload\"\n[[schedule]]\nname = \"tick\"\nevery = \"10s\"\npath = \"/tick\"\nmethod = \"GET\"\nmissed = \"skip\"\n",
        ))
        .unwrap();
        assert_eq!(spec.schedules.len(), 2);
        assert_eq!(spec.schedules[0].method, "POST");
        assert_eq!(spec.schedules[0].missed, Missed::Once);
        assert_eq!(spec.schedules[1].missed, Missed::Skip);
        assert_eq!(
            AppSpec::from_stored_json(&spec.to_stored_json()).unwrap(),
            spec
        );
        assert!(!AppSpec::from_manifest(&manifest(""))
            .unwrap()
            .to_stored_json()
            .contains("schedule"));
        let one = |body: &str| {
            manifest(&format!(
                "[[schedule]]\nname = \"s\"\npath = \"/s\"\n{body}"
            ))
        };
        for (text, said) in [
            (one(""), "give either `every`"),
            (one("every = \"1s\"\ncron = \"* * * * *\"\n"), "one of them"),
            (one("every = \"100ms\"\n"), "out of range"),
            (one("cron = \"* * *\"\n"), "has 3 fields"),
            (
                one("every = \"1s\"\nmethod = \"DELETE\"\n"),
                "use GET, POST or PUT",
            ),
            (
                one("every = \"1s\"\nmissed = \"twice\"\n"),
                "unknown variant `twice`",
            ),
            (
                manifest("[[schedule]]\nname = \"s\"\npath = \"no-slash\"\nevery = \"1s\"\n"),
                "must start with /",
            ),
            (
                manifest("[[schedule]]\nname = \"Bad Name\"\npath = \"/\"\nevery = \"1s\"\n"),
                "a name is 1 to 64",
            ),
            (
                format!(
                    "{}{}",
                    one("every = \"1s\"\n"),
                    "[[schedule]]\nname = \"s\"\npath = \"/\"\nevery = \"2s\"\n"
                ),
                "two schedules have this name",
            ),
        ] {
            let error = AppSpec::from_manifest(&text).unwrap_err().to_string();
            assert!(error.contains(said), "{text}: {error}");
        }
    }

    #[test]
    fn stored_json_round_trips() {
        let spec = AppSpec::from_manifest(&manifest(
            "[limits]\nmemory = \"1.5MiB\"\ntimeout = \"1500ms\"\n",
        ))
        .unwrap();
        let back = AppSpec::from_stored_json(&spec.to_stored_json()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let cases = [
            (manifest("colour = \"red\"\n"), "unknown field `colour`"),
            (
                manifest("[limits]\nmemory = \"lots\"\n"),
                "`lots` is not a size",
            ),
            (manifest("[limits]\nmemory = \"8GiB\"\n"), "out of range"),
            (manifest("[limits]\ninstances = 0\n"), "instances = 0"),
            (
                manifest("[limits]\ntimeout = \"5 parsecs\"\n"),
                "not a duration",
            ),
            (manifest("[limits]\ncpu = -1.0\n"), "cpu = -1"),
            (
                manifest("[limits]\nlog_rate = \"100B\"\n"),
                "log_rate = \"100B\" is too small",
            ),
            (manifest("[limits]\nshoes = 2\n"), "unknown field `shoes`"),
            (
                manifest("[limits]\nmemory_total = \"1MiB\"\n"),
                "at least 8MiB",
            ),
            (manifest("[limits]\npids = 2\n"), "at least 8 threads"),
            (manifest("[limits]\nidle = \"1ms\"\n"), "too short"),
            (
                manifest("header_timeout = \"5ms\"\n"),
                "header_timeout = \"5ms\" is out of range",
            ),
            (manifest("max_header_size = \"100B\"\n"), "max_header_size"),
            (manifest("max_connections = 0\n"), "max_connections = 0"),
            ("name = \"Hello World\"\n".to_string(), "not allowed"),
            (
                "name = \"a\"\ncomponent = \"app.wasm\"\n[http]\nlisten = \"127.0.0.1:1\"\n"
                    .to_string(),
                "not a component digest",
            ),
            (
                format!(
                    "name = \"a\"\ncomponent = \"{DIGEST}\"\n[http]\nlisten = \"127.0.0.1:0\"\n"
                ),
                "port 0",
            ),
            (
                format!("name = \"a\"\ncomponent = \"{DIGEST}\"\n[[schedule]]\nname = \"t\"\nevery = \"1m\"\npath = \"/\"\n"),
                "it is a command: a schedule runs it",
            ),
            ("this is = not toml [".to_string(), "line 1"),
            (
                manifest("[config]\n\"a b\" = \"x\"\n"),
                "[config] key `a b`",
            ),
            (manifest("[secrets]\n\"\" = \"x\"\n"), "[secrets] key ``"),
            (
                manifest(&format!("[config]\n{} = \"x\"\n", "k".repeat(129))),
                "is not allowed",
            ),
            (
                manifest("[config]\nport = 5\n"),
                "[config] `port` must be a string",
            ),
            (
                manifest("[config]\ntoken = \"a\"\n[secrets]\ntoken = \"b\"\n"),
                "in both [config] and [secrets]",
            ),
            (
                manifest(&format!("[config]\nbig = \"{}\"\n", "x".repeat(300 << 10))),
                "at most 262144",
            ),
        ];
        for (text, expected) in cases {
            let err = AppSpec::from_manifest(&text).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "manifest:\n{text}\nerror: {err}\nexpected: {expected}"
            );
        }
    }

    #[test]
    fn a_manifest_without_http_is_a_command_whose_schedules_take_arguments() {
        let spec = AppSpec::from_manifest(&format!(
            "name = \"job\"\ncomponent = \"{DIGEST}\"\n[[schedule]]\nname = \"hourly\"\ncron = \"0 * * * *\"\nargs = [\"upload\", \"--all\"]\n"
        ))
        .unwrap();
        assert!(spec.is_command());
        assert_eq!(spec.listen(), None);
        assert_eq!(spec.schedules[0].args, ["upload", "--all"]);
        // Stored without the parts it lacks, and read back the same.
        let stored = spec.to_stored_json();
        assert!(
            !stored.contains("http") && !stored.contains("path"),
            "{stored}"
        );
        assert_eq!(AppSpec::from_stored_json(&stored).unwrap(), spec);
        // An HTTP app's schedule takes no arguments.
        let err = AppSpec::from_manifest(&manifest(
            "[[schedule]]\nname = \"t\"\nevery = \"1m\"\npath = \"/\"\nargs = [\"x\"]\n",
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("`args` are for command apps"),
            "{err}"
        );
        assert!(check_run_args(&["a\0b".to_string()]).is_err());
        assert!(check_run_args(&vec!["x".to_string(); MAX_RUN_ARGS + 1]).is_err());
        assert!(check_run_args(&["x".repeat(MAX_RUN_ARG_BYTES)]).is_err());
        assert!(check_run_args(&["fine".to_string()]).is_ok());
    }

    #[test]
    fn a_refused_value_is_never_quoted() {
        for (tables, expected) in [
            (
                "[secrets]\ntok = 12345678\n",
                "[secrets] `tok` must be a string",
            ),
            (
                "[secrets]\ntok = 31415.9265\n",
                "[secrets] `tok` must be a string",
            ),
            (
                "[secrets]\ntok = [98765]\n",
                "[secrets] `tok` must be a string",
            ),
            (
                "[secrets]\ntok = { n = 98765 }\n",
                "[secrets] `tok` must be a string",
            ),
            ("secrets = \"LEAKED-98765\"\n", "[secrets] must be a table"),
            ("secrets = 98765\n", "[secrets] must be a table"),
            (
                "[config]\nport = 98765.5\n",
                "[config] `port` must be a string",
            ),
            ("[env]\nPIN = 98765\n", "[env] `PIN` must be a string"),
        ] {
            // The tables go before [http] would take them: at the top level of the manifest.
            let text = format!(
                "name = \"hello\"\ncomponent = \"{DIGEST}\"\n{}[http]\nlisten = \"127.0.0.1:8080\"\n",
                if tables.starts_with('[') { "" } else { tables }
            );
            let text = if tables.starts_with('[') {
                format!("{text}{tables}")
            } else {
                text
            };
            let err = AppSpec::from_manifest(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{tables}: {err}");
            assert!(
                !err.contains("98765") && !err.contains("31415"),
                "{tables}: {err}"
            );
        }
        let long = "k".repeat(20_000);
        let err = AppSpec::from_manifest(&manifest(&format!("[config]\n{long} = \"v\"\n")))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400, "{} bytes", err.len());
    }

    #[test]
    fn config_and_secrets_are_read_alike_and_secrets_never_printed() {
        let spec = AppSpec::from_manifest(&manifest(
            "[config]\napi_url = \"https://example.net\"\n[secrets]\napi_token = \"s3cret-value\"\n",
        ))
        .unwrap();
        assert_eq!(
            spec.config_value("api_url"),
            Some(("https://example.net", ConfigSource::Config))
        );
        assert_eq!(
            spec.config_value("api_token"),
            Some(("s3cret-value", ConfigSource::Secret))
        );
        assert_eq!(spec.config_value("nothing"), None);
        let printed = format!("{spec:?}");
        assert!(printed.contains("api_token"), "{printed}");
        assert!(!printed.contains("s3cret-value"), "{printed}");
        // The store keeps them (it is the device's own, root's only); they round-trip.
        let back = AppSpec::from_stored_json(&spec.to_stored_json()).unwrap();
        assert_eq!(back, spec);
        // A spec without them stores no trace of them, so older cairn still reads it.
        let plain = AppSpec::from_manifest(&manifest("")).unwrap();
        let json = plain.to_stored_json();
        assert!(
            !json.contains("config") && !json.contains("secrets"),
            "{json}"
        );
    }

    #[test]
    fn sizes_and_durations_parse_and_print() {
        for (text, bytes) in [
            ("64MiB", 64 << 20),
            ("512 KiB", 512 << 10),
            ("1GiB", 1 << 30),
            ("10MB", 10_000_000),
            ("4096", 4096),
        ] {
            assert_eq!(text.parse::<ByteSize>().unwrap(), ByteSize(bytes), "{text}");
        }
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        for (text, millis) in [
            ("5s", 5000),
            ("250ms", 250),
            ("1.5s", 1500),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ] {
            assert_eq!(
                text.parse::<HumanDuration>().unwrap().0,
                Duration::from_millis(millis),
                "{text}"
            );
        }
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        assert_eq!(HumanDuration(Duration::from_secs(5)).to_string(), "5s");
        assert!("5".parse::<HumanDuration>().is_err());
        assert!("-5MiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn app_names_are_checked() {
        for good in ["a", "hello", "hello-2", "0app"] {
            assert!(good.parse::<AppName>().is_ok(), "{good}");
        }
        for bad in ["", "-a", "Hello", "a_b", "a/b", &"x".repeat(64)] {
            assert!(bad.parse::<AppName>().is_err(), "{bad}");
        }
    }
}
